//! Files: `uploadFile` streams a file to the app's Dify as the caller's Dify user and records
//! it, so that only its owner can attach it to a turn on that app; `ChatInput.files` attaches
//! uploads or links, checked against the app's `FileUploadSettings`.

pub mod graphql;

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use crate::apps::AppId;
use crate::apps::parameters::FileUploadSettings;
use crate::db::schema::uploaded_files;
use crate::db::types::uuid_id;
use crate::error::AppError;
use crate::users::domain::UserId;

uuid_id!(
    /// An uploaded file's id in rechat.
    FileId,
    "file"
);

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = uploaded_files, check_for_backend(diesel::mysql::Mysql))]
pub struct FileRecord {
    pub id: FileId,
    pub user_id: UserId,
    pub app_id: AppId,
    pub dify_file_id: String,
    pub name: String,
    pub size: i64,
    pub mime_type: Option<String>,
    pub extension: Option<String>,
    pub file_type: String,
    pub created_at: NaiveDateTime,
}

pub async fn insert(conn: &mut AsyncMysqlConnection, file: &FileRecord) -> QueryResult<()> {
    diesel::insert_into(uploaded_files::table)
        .values(file)
        .execute(conn)
        .await
        .map(drop)
}

/// `owner`'s uploads among `ids`.
pub async fn owned(
    conn: &mut AsyncMysqlConnection,
    owner: UserId,
    ids: &[FileId],
) -> QueryResult<Vec<FileRecord>> {
    uploaded_files::table
        .filter(uploaded_files::user_id.eq(owner))
        .filter(uploaded_files::id.eq_any(ids))
        .select(FileRecord::as_select())
        .load(conn)
        .await
}

/// The file types Dify knows, by extension (Dify's own lists); anything else is `custom`.
pub fn type_of_extension(extension: &str) -> &'static str {
    match extension
        .trim_start_matches('.')
        .to_ascii_lowercase()
        .as_str()
    {
        "jpg" | "jpeg" | "png" | "webp" | "gif" | "svg" => "image",
        "txt" | "markdown" | "md" | "mdx" | "pdf" | "html" | "htm" | "xlsx" | "xls" | "vtt"
        | "properties" | "doc" | "docx" | "csv" | "eml" | "msg" | "pptx" | "ppt" | "xml"
        | "epub" => "document",
        "mp3" | "m4a" | "wav" | "amr" | "mpga" => "audio",
        "mp4" | "mov" | "mpeg" | "webm" => "video",
        _ => "custom",
    }
}

/// The extension of a file name, without the dot.
pub fn extension_of(name: &str) -> Option<String> {
    let (_, extension) = name.rsplit_once('.')?;
    (!extension.is_empty()
        && extension.len() <= 16
        && extension.chars().all(|c| c.is_ascii_alphanumeric()))
    .then(|| extension.to_ascii_lowercase())
}

/// Whether an app takes a file of this type and extension; `field` names the input refused.
pub fn check_type(
    settings: &FileUploadSettings,
    file_type: &str,
    extension: Option<&str>,
    field: String,
) -> Result<(), AppError> {
    if !settings.enabled {
        return Err(AppError::bad_input_owned(
            field,
            "this app does not take files",
        ));
    }
    let allowed = &settings.allowed_file_types;
    let by_type = allowed.is_empty() || allowed.iter().any(|t| t == file_type);
    let by_extension = allowed.iter().any(|t| t == "custom")
        && extension.is_some_and(|e| {
            settings
                .allowed_file_extensions
                .iter()
                .any(|a| a.trim_start_matches('.').eq_ignore_ascii_case(e))
        });
    if by_type || by_extension {
        Ok(())
    } else {
        Err(AppError::bad_input_owned(
            field,
            format!(
                "this app takes {} files, not {file_type}",
                allowed.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_difys_extension_lists() {
        assert_eq!(type_of_extension("PNG"), "image");
        assert_eq!(type_of_extension(".pdf"), "document");
        assert_eq!(type_of_extension("wav"), "audio");
        assert_eq!(type_of_extension("mp4"), "video");
        assert_eq!(type_of_extension("parquet"), "custom");
        assert_eq!(extension_of("Report.Final.PDF").as_deref(), Some("pdf"));
        assert_eq!(extension_of("noextension"), None);
    }

    #[test]
    fn an_app_takes_only_its_types() {
        let settings = FileUploadSettings {
            enabled: true,
            allowed_file_types: vec!["image".into(), "custom".into()],
            allowed_file_extensions: vec![".csv".into()],
            ..Default::default()
        };
        let check = |t: &str, e: &str| check_type(&settings, t, Some(e), "file".into()).is_ok();
        assert!(check("image", "png"));
        assert!(check("document", "csv"), "custom extensions");
        assert!(!check("document", "pdf"));
        let off = FileUploadSettings::default();
        assert!(check_type(&off, "image", Some("png"), "file".into()).is_err());
    }
}
