//! Token quotas: tokens per user per calendar month (UTC), settled from Dify's usage as answers
//! end, checked before each turn. Both sides are single SQL statements (the settlement is one
//! transaction), so several gateways on one database share one count. A quota can be passed by
//! the answers already running when it is reached (at most `MAX_ACTIVE_ANSWERS_PER_USER`), never
//! by a turn started after.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use crate::conversations::domain::MessageId;
use crate::db::schema::{token_usage, users};
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

/// Adds an answer's tokens to its owner's period, once: in one transaction the answer is
/// marked settled and, only if it was not yet, its tokens are added, so a retried final write
/// never counts them twice. One round trip (the values are ids, a date and a number, written as
/// literals), since it runs once per answer on the writer's pool.
pub async fn settle(
    conn: &mut AsyncMysqlConnection,
    message: MessageId,
    user: UserId,
    tokens: u64,
) -> QueryResult<()> {
    use diesel_async::SimpleAsyncConnection;
    let period = period_start(crate::db::types::now());
    let (message, user) = (message.0.simple(), user.0.simple());
    let tokens = tokens.min(i64::MAX as u64);
    let script = format!(
        "START TRANSACTION; \
         UPDATE messages SET tokens_settled = TRUE \
          WHERE id = X'{message}' AND tokens_settled = FALSE; \
         INSERT INTO token_usage (user_id, period_start, total_tokens) \
          SELECT X'{user}', '{period}', {tokens} FROM DUAL WHERE ROW_COUNT() = 1 \
          ON DUPLICATE KEY UPDATE total_tokens = total_tokens + VALUES(total_tokens); \
         COMMIT"
    );
    let result = conn.batch_execute(&script).await;
    if result.is_err() {
        // Never hand back a connection with the transaction open.
        let _ = conn.batch_execute("ROLLBACK").await;
    }
    result
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
