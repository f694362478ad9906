//! Conversation and message rules: ids, roles, statuses, titles.

use crate::db::types::{text_enum, uuid_id};
use crate::error::AppError;

uuid_id!(
    /// A conversation's id.
    ConversationId,
    "conversation"
);
uuid_id!(
    /// A message's id.
    MessageId,
    "message"
);

text_enum!(
    /// Who wrote a message.
    MessageRole {
        /// The signed-in user's query.
        User => "USER",
        /// The Dify app's answer.
        Assistant => "ASSISTANT",
    }
);

text_enum!(
    /// Where a message is in its life.
    MessageStatus {
        /// The answer is still arriving from Dify.
        Streaming => "STREAMING",
        /// The answer is complete.
        Completed => "COMPLETED",
        /// The user stopped the answer; the content is what had arrived.
        Stopped => "STOPPED",
        /// Dify failed; `error` says why and the content is what had arrived.
        Failed => "FAILED",
        /// The gateway serving the answer went away; the content is what had been saved.
        Interrupted => "INTERRUPTED",
    }
);

text_enum!(
    /// A user's rating of an answer.
    Rating {
        /// Thumbs up.
        Like => "LIKE",
        /// Thumbs down.
        Dislike => "DISLIKE",
    }
);

pub const AUTO_TITLE_CHARS: usize = 50;
pub const TITLE_MAX_CHARS: usize = 255;

/// The title of a new conversation: its first query on one line, cut to 50 characters.
pub fn title_from_query(query: &str) -> String {
    let line = query.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut title: String = line.chars().take(AUTO_TITLE_CHARS).collect();
    if line.chars().count() > AUTO_TITLE_CHARS {
        title = title.trim_end().to_owned();
        title.push('…');
    }
    if title.is_empty() {
        "New conversation".into()
    } else {
        title
    }
}

/// A title set by the user: trimmed, 1 to 255 characters.
pub fn clean_title(title: &str) -> Result<String, AppError> {
    let title = title.trim();
    let len = title.chars().count();
    if len == 0 || len > TITLE_MAX_CHARS {
        return Err(AppError::bad_input(
            "title",
            format!("the title must have 1 to {TITLE_MAX_CHARS} characters"),
        ));
    }
    Ok(title.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_from_queries() {
        assert_eq!(title_from_query("  hello\n  world "), "hello world");
        let long = "年假".repeat(40);
        let title = title_from_query(&long);
        assert_eq!(title.chars().count(), AUTO_TITLE_CHARS + 1);
        assert!(title.ends_with('…'));
    }

    #[test]
    fn user_titles_are_checked() {
        assert_eq!(clean_title("  Plans ").unwrap(), "Plans");
        assert!(clean_title("   ").is_err());
        assert!(clean_title(&"x".repeat(256)).is_err());
        assert!(clean_title(&"é".repeat(255)).is_ok());
    }
}
