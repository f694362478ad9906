//! Token quotas: tokens per user per calendar month (UTC), settled from Dify's usage as answers
//! end, checked before each turn. An answer's final write records its tokens; the process's
//! writer adds them to the month's total on its next tick (`settle`, one transaction per batch of
//! answers). Both sides are in SQL, so several gateways on one database share one count. A quota
//! can be passed by the answers already running when it is reached (at most
//! `MAX_ACTIVE_ANSWERS_PER_USER`) and by turns started within a tick of it, never later.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use crate::conversations::domain::MessageId;
use crate::db::schema::{conversations, messages, token_usage, users};
use crate::users::domain::UserId;

/// The first day of the month `at` is in.
pub fn period_start(at: NaiveDateTime) -> NaiveDate {
    at.date().with_day(1).expect("every month has a first day")
}

/// When the period that started on `start` ends (midnight UTC on the next month's first day).
pub fn period_end(start: NaiveDate) -> DateTime<Utc> {
    let next = start
        .checked_add_months(chrono::Months::new(1))
        .expect("a representable date");
    next.and_hms_opt(0, 0, 0).expect("midnight").and_utc()
}

/// The quota that applies: the admin's choice when one was made (`None` = unlimited), else
/// `DEFAULT_TOKEN_QUOTA`.
pub fn effective(quota: Option<i64>, set: bool, default: Option<u64>) -> Option<u64> {
    if set {
        quota.map(|q| q.max(0) as u64)
    } else {
        default
    }
}

/// Tokens `user` used in the period starting on `period`.
pub async fn used(
    conn: &mut AsyncMysqlConnection,
    user: UserId,
    period: NaiveDate,
) -> QueryResult<u64> {
    let total: Option<i64> = token_usage::table
        .find((user, period))
        .select(token_usage::total_tokens)
        .first(conn)
        .await
        .optional()?;
    Ok(total.unwrap_or(0).max(0) as u64)
}

/// The admin's choice for `user`: `(quota, set)`.
pub async fn quota_of(
    conn: &mut AsyncMysqlConnection,
    user: UserId,
) -> QueryResult<(Option<i64>, bool)> {
    users::table
        .find(user)
        .select((users::token_quota, users::token_quota_set))
        .first(conn)
        .await
}

pub async fn set_quota(
    conn: &mut AsyncMysqlConnection,
    user: UserId,
    quota: Option<i64>,
) -> QueryResult<usize> {
    diesel::update(users::table.find(user))
        .set((
            users::token_quota.eq(quota),
            users::token_quota_set.eq(true),
            users::updated_at.eq(crate::db::types::now()),
        ))
        .execute(conn)
        .await
}

/// Answers settled per transaction, at most.
pub const SETTLE_BATCH: i64 = 1000;

/// Adds the tokens of finished answers not yet counted to their owners' periods, for every
/// gateway's answers: in one transaction the answers are locked, their owners' totals raised
/// (one statement for all owners) and the answers marked settled, so nothing is counted twice,
/// even by two gateways settling at once. Statements follow batches, not answers. Returns how
/// many answers were settled; a full batch means more may wait.
pub async fn settle(conn: &mut AsyncMysqlConnection) -> QueryResult<usize> {
    use diesel_async::AsyncConnection;
    let period = period_start(crate::db::types::now());
    conn.transaction(async |conn| {
        let pending: Vec<(MessageId, UserId, i64)> = messages::table
            .inner_join(conversations::table)
            .filter(messages::tokens_settled.eq(false))
            .filter(messages::tokens.gt(0))
            .select((messages::id, conversations::user_id, messages::tokens))
            .limit(SETTLE_BATCH)
            .for_update()
            .load(conn)
            .await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let mut totals: std::collections::HashMap<UserId, i64> = Default::default();
        for (_, user, tokens) in &pending {
            *totals.entry(*user).or_default() += tokens;
        }
        let rows: Vec<_> = totals
            .into_iter()
            .map(|(user, tokens)| {
                (
                    token_usage::user_id.eq(user),
                    token_usage::period_start.eq(period),
                    token_usage::total_tokens.eq(tokens),
                )
            })
            .collect();
        diesel::insert_into(token_usage::table)
            .values(rows)
            .on_conflict(diesel::dsl::DuplicatedKeys)
            .do_update()
            .set(token_usage::total_tokens.eq(token_usage::total_tokens
                + diesel::dsl::sql::<diesel::sql_types::BigInt>("VALUES(total_tokens)")))
            .execute(conn)
            .await?;
        let ids: Vec<MessageId> = pending.iter().map(|(id, _, _)| *id).collect();
        diesel::update(messages::table.filter(messages::id.eq_any(&ids)))
            .set(messages::tokens_settled.eq(true))
            .execute(conn)
            .await?;
        Ok(pending.len())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_calendar_months_in_utc() {
        let at = NaiveDate::from_ymd_opt(2026, 12, 31)
            .unwrap()
            .and_hms_opt(23, 59, 59)
            .unwrap();
        let start = period_start(at);
        assert_eq!(start, NaiveDate::from_ymd_opt(2026, 12, 1).unwrap());
        assert_eq!(period_end(start).to_rfc3339(), "2027-01-01T00:00:00+00:00");
    }

    #[test]
    fn an_admins_choice_wins_over_the_default() {
        assert_eq!(effective(None, false, Some(100)), Some(100));
        assert_eq!(effective(None, true, Some(100)), None, "set to unlimited");
        assert_eq!(effective(Some(5), true, None), Some(5));
        assert_eq!(effective(None, false, None), None);
    }
}
