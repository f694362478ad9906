//! Token quotas: tokens per user per calendar month (UTC), settled from Dify's usage as answers
//! end, checked before each turn. Both sides are single SQL statements (the settlement is one
//! transaction), so several gateways on one database share one count. A quota can be passed by
//! the answers already running when it is reached (at most `MAX_ACTIVE_ANSWERS_PER_USER`), never
//! by a turn started after.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};

use crate::conversations::domain::MessageId;
use crate::db::schema::{messages, token_usage, users};
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

/// Adds an answer's tokens to its owner's period, once: the answer is marked settled in the same
/// transaction, so a retried final write does not count them again.
pub async fn settle(
    conn: &mut AsyncMysqlConnection,
    message: MessageId,
    user: UserId,
    tokens: u64,
) -> QueryResult<()> {
    let period = period_start(crate::db::types::now());
    conn.transaction(async |conn| {
        let first = diesel::update(
            messages::table
                .find(message)
                .filter(messages::tokens_settled.eq(false)),
        )
        .set(messages::tokens_settled.eq(true))
        .execute(conn)
        .await?;
        if first == 1 {
            let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
            diesel::insert_into(token_usage::table)
                .values((
                    token_usage::user_id.eq(user),
                    token_usage::period_start.eq(period),
                    token_usage::total_tokens.eq(tokens),
                ))
                .on_conflict(diesel::dsl::DuplicatedKeys)
                .do_update()
                .set(token_usage::total_tokens.eq(token_usage::total_tokens + tokens))
                .execute(conn)
                .await?;
        }
        Ok(())
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
