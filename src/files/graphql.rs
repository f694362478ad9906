//! `UploadedFile`, `uploadFile`, and `ChatInput.files`.

use async_graphql::{Context, ID, InputObject, Object, SimpleObject, Upload};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{FileId, FileRecord, check_type, extension_of, type_of_extension};
use crate::apps::parameters::FileUploadSettings;
use crate::apps::{AppId, LoadedApp};
use crate::conversations::graphql::MessageFile;
use crate::db::types::{now, utc};
use crate::dify::DifyError;
use crate::error::{AppError, AppResult};
use crate::graphql::context::ContextExt;
use crate::users::domain::UserId;

/// A file uploaded to an app, ready to attach to a turn (`ChatFileInput.uploadedFileId`).
#[derive(SimpleObject, Clone)]
pub struct UploadedFile {
    /// rechat's id; pass it in `ChatFileInput.uploadedFileId`.
    pub id: ID,
    /// The file's name as uploaded.
    pub name: String,
    /// Bytes.
    pub size: i64,
    /// Null when Dify gives none.
    pub mime_type: Option<String>,
    /// Without the dot, lower-case.
    pub extension: Option<String>,
    /// `image`, `document`, `audio`, `video` or `custom`.
    #[graphql(name = "type")]
    pub kind: String,
    /// When it was uploaded.
    pub created_at: DateTime<Utc>,
}

impl From<&FileRecord> for UploadedFile {
    fn from(file: &FileRecord) -> Self {
        Self {
            id: file.id.into(),
            name: file.name.clone(),
            size: file.size,
            mime_type: file.mime_type.clone(),
            extension: file.extension.clone(),
            kind: file.file_type.clone(),
            created_at: utc(file.created_at),
        }
    }
}

/// A file to attach to a turn: exactly one of `uploadedFileId` and `url`.
#[derive(InputObject, Clone)]
pub struct ChatFileInput {
    /// A file you uploaded with `uploadFile` to the same app.
    pub uploaded_file_id: Option<ID>,
    /// A file on the web (http or https), fetched by Dify.
    pub url: Option<String>,
    /// `image`, `document`, `audio`, `video` or `custom`; derived from the file when omitted.
    #[graphql(name = "type")]
    pub kind: Option<String>,
}

const FILE_TYPES: [&str; 5] = ["image", "document", "audio", "video", "custom"];
/// Most files one turn may carry, whatever the app allows.
pub const MAX_FILES_PER_TURN: usize = 20;

/// A turn's attachments, with the uploads they name loaded (owner checked).
pub struct TurnFiles {
    items: Vec<(ChatFileInput, Option<FileRecord>)>,
}

impl TurnFiles {
    /// Checks the shape of every attachment and loads `owner`'s uploads among them; an upload
    /// that is not the caller's is `NOT_FOUND`.
    /// `prefix` names where the files came from in errors (`files`, `inputs`).
    pub async fn load(
        app: &crate::app::App,
        owner: UserId,
        files: Vec<ChatFileInput>,
        prefix: &str,
    ) -> AppResult<Self> {
        if files.len() > MAX_FILES_PER_TURN {
            return Err(AppError::bad_input_owned(
                prefix.to_owned(),
                format!("a turn may carry at most {MAX_FILES_PER_TURN} files"),
            ));
        }
        let mut ids = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let field = |name: &str| format!("{prefix}.{i}.{name}");
            match (&file.uploaded_file_id, &file.url) {
                (Some(id), None) => {
                    ids.push(FileId::parse("uploadedFileId", id).map_err(|_| {
                        AppError::bad_input_owned(field("uploadedFileId"), "not a valid file id")
                    })?)
                }
                (None, Some(url)) => {
                    let ok = url::Url::parse(url.trim()).is_ok_and(|u| {
                        matches!(u.scheme(), "http" | "https") && u.host().is_some()
                    });
                    if !ok || url.len() > 2048 {
                        return Err(AppError::bad_input_owned(
                            field("url"),
                            "an http(s) URL of at most 2048 characters",
                        ));
                    }
                }
                _ => {
                    return Err(AppError::bad_input_owned(
                        format!("{prefix}.{i}"),
                        "give exactly one of uploadedFileId and url",
                    ));
                }
            }
            if let Some(kind) = &file.kind
                && !FILE_TYPES.contains(&kind.as_str())
            {
                return Err(AppError::bad_input_owned(
                    field("type"),
                    format!("one of {}", FILE_TYPES.join(", ")),
                ));
            }
        }
        let uploads = if ids.is_empty() {
            Vec::new()
        } else {
            let mut conn = app.db.get().await?;
            super::owned(&mut conn, owner, &ids).await?
        };
        let mut items = Vec::with_capacity(files.len());
        for file in files {
            let upload = match &file.uploaded_file_id {
                Some(id) => {
                    let id = FileId::parse("uploadedFileId", id)?;
                    Some(
                        uploads
                            .iter()
                            .find(|u| u.id == id)
                            .cloned()
                            .ok_or(AppError::NotFound("uploaded file"))?,
                    )
                }
                None => None,
            };
            items.push((file, upload));
        }
        Ok(Self { items })
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Checks the attachments against the turn's app; returns Dify's `files` and the user
    /// message's attachment list.
    pub fn for_app(&self, app: &LoadedApp) -> AppResult<(Vec<Value>, Vec<MessageFile>)> {
        if self.items.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let settings = app.file_upload();
        if let Some(limit) = settings.number_limit
            && self.items.len() > limit.max(0) as usize
        {
            return Err(AppError::LimitExceeded {
                limit: "fileUpload.numberLimit",
                max: limit.max(0) as u64,
                message: format!("this app takes at most {limit} files per turn"),
            });
        }
        let mut dify = Vec::new();
        let mut listed = Vec::new();
        for (i, (file, upload)) in self.items.iter().enumerate() {
            let (sent, shown) = attachment(
                file,
                upload.as_ref(),
                app.record.id,
                &settings,
                &format!("files.{i}"),
            )?;
            dify.push(sent);
            listed.push(shown);
        }
        Ok((dify, listed))
    }
}

impl TurnFiles {
    /// Puts Dify's file objects in the values of the form's `file` and `file-list` variables,
    /// where `inputs` name files like `ChatFileInput` does (`{"uploadedFileId": …}` or
    /// `{"url": …}`, a list of them for `file-list`), checked against the variable's settings.
    pub fn fill_inputs(
        &self,
        app: &LoadedApp,
        inputs: &mut serde_json::Map<String, Value>,
    ) -> AppResult<()> {
        let Some(parameters) = &app.parameters else {
            return Ok(());
        };
        for field in &parameters.user_input_form {
            let list = match field.kind.as_str() {
                "file" => false,
                "file-list" => true,
                _ => continue,
            };
            let Some(value) = inputs.get_mut(&field.variable) else {
                continue;
            };
            let name = format!("inputs.{}", field.variable);
            let refs = file_refs(value);
            if refs.is_empty() || (!list && refs.len() > 1) {
                return Err(AppError::bad_input_owned(
                    name,
                    if list {
                        "a list of {\"uploadedFileId\"} or {\"url\"} objects"
                    } else {
                        "one {\"uploadedFileId\"} or {\"url\"} object"
                    },
                ));
            }
            let settings = variable_settings(&field.raw.0, parameters.file_upload.max_bytes);
            let mut sent = Vec::new();
            for (i, reference) in refs.iter().enumerate() {
                let (file, upload) = self
                    .items
                    .iter()
                    .find(|(file, _)| {
                        file.uploaded_file_id == reference.uploaded_file_id
                            && file.url == reference.url
                    })
                    .ok_or_else(|| AppError::bad_input_owned(name.clone(), "an unknown file"))?;
                let field_name = if list {
                    format!("{name}.{i}")
                } else {
                    name.clone()
                };
                sent.push(
                    attachment(file, upload.as_ref(), app.record.id, &settings, &field_name)?.0,
                );
            }
            *value = if list {
                Value::Array(sent)
            } else {
                sent.pop().unwrap_or(Value::Null)
            };
        }
        Ok(())
    }
}

/// The files a value names: one `{uploadedFileId | url, type?}` object, or a list of them.
fn file_refs(value: &Value) -> Vec<ChatFileInput> {
    let one = |v: &Value| {
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let file = ChatFileInput {
            uploaded_file_id: text("uploadedFileId").map(ID),
            url: text("url"),
            kind: text("type"),
        };
        (file.uploaded_file_id.is_some() || file.url.is_some()).then_some(file)
    };
    match value {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        Value::Object(_) => one(value).into_iter().collect(),
        _ => Vec::new(),
    }
}

/// The files every `file` and `file-list` variable of `inputs` names, to load with the turn's.
pub fn input_files(inputs: &serde_json::Map<String, Value>) -> Vec<ChatFileInput> {
    inputs.values().flat_map(file_refs).collect()
}

/// A `file`/`file-list` variable's own settings, from Dify's description of it.
fn variable_settings(raw: &Value, max_bytes: Option<i64>) -> FileUploadSettings {
    let strings = |key: &str| {
        raw.get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    FileUploadSettings {
        enabled: true,
        allowed_file_types: strings("allowed_file_types"),
        allowed_file_extensions: strings("allowed_file_extensions"),
        allowed_transfer_methods: strings("allowed_file_upload_methods"),
        number_limit: raw
            .get("max_length")
            .and_then(Value::as_i64)
            .map(|n| n.clamp(0, i32::MAX as i64) as i32),
        max_bytes,
    }
}

/// One attachment, checked against `settings` (`field` names it in errors): Dify's file
/// object, and the entry the user message lists.
fn attachment(
    file: &ChatFileInput,
    upload: Option<&FileRecord>,
    app: AppId,
    settings: &FileUploadSettings,
    field: &str,
) -> AppResult<(Value, MessageFile)> {
    let method = if upload.is_some() {
        "local_file"
    } else {
        "remote_url"
    };
    let methods = &settings.allowed_transfer_methods;
    if !methods.is_empty() && !methods.iter().any(|m| m == method) {
        return Err(AppError::bad_input_owned(
            field.to_owned(),
            format!("this app does not take files by {method}"),
        ));
    }
    let extension = match (upload, &file.url) {
        (Some(upload), _) => upload.extension.clone(),
        (None, Some(url)) => url::Url::parse(url.trim())
            .ok()
            .and_then(|u| u.path_segments()?.next_back().and_then(extension_of)),
        _ => None,
    };
    let kind = file
        .kind
        .clone()
        .or_else(|| upload.map(|u| u.file_type.clone()))
        .unwrap_or_else(|| {
            extension
                .as_deref()
                .map_or("custom", type_of_extension)
                .to_owned()
        });
    check_type(settings, &kind, extension.as_deref(), field.to_owned())?;
    Ok(match upload {
        Some(upload) => {
            if upload.app_id != app {
                return Err(AppError::bad_input_owned(
                    format!("{field}.uploadedFileId"),
                    "this file was uploaded to another app; upload it to this one",
                ));
            }
            (
                json!({ "type": kind, "transfer_method": "local_file", "upload_file_id": upload.dify_file_id }),
                MessageFile {
                    id: upload.id.into(),
                    kind,
                    url: None,
                    belongs_to: Some("user".into()),
                },
            )
        }
        None => {
            let url = file.url.clone().unwrap_or_default().trim().to_owned();
            (
                json!({ "type": kind, "transfer_method": "remote_url", "url": url }),
                MessageFile {
                    id: ID(format!("url-{}", uuid::Uuid::new_v4().simple())),
                    kind,
                    url: Some(url),
                    belongs_to: Some("user".into()),
                },
            )
        }
    })
}

#[derive(Default)]
pub struct FileMutation;

#[Object]
impl FileMutation {
    /// Uploads a file to an app (the default app when `appId` is omitted), for you to attach to
    /// a turn on that app. Sent as a GraphQL multipart request (`POST /graphql`,
    /// `multipart/form-data` with `operations`, `map` and the file) with an `Authorization`
    /// header. The file is streamed to Dify, never held whole in memory. Refused when the app
    /// does not take the file's type (`BAD_USER_INPUT`, field `file`), it is larger than
    /// `fileUpload.maxBytes` (`LIMIT_EXCEEDED`), or you uploaded `UPLOADS_PER_MINUTE` files in
    /// the last minute (`RATE_LIMITED`).
    async fn upload_file(
        &self,
        ctx: &Context<'_>,
        app_id: Option<ID>,
        file: Upload,
    ) -> AppResult<UploadedFile> {
        let user = ctx.user()?;
        let app = ctx.app();
        let requested = app_id.map(|id| AppId::parse("appId", &id)).transpose()?;
        app.throttles
            .uploads
            .take(&user.id, app.config.uploads_per_minute)
            .await
            .map_err(|retry_after| AppError::RateLimited { retry_after })?;
        let apps = app.apps().await?;
        let (loaded, dify) = apps.for_turn(None, requested)?;
        let upload = file
            .value(ctx)
            .map_err(|_| AppError::bad_input("file", "the file is missing from the request"))?;
        let name: String = upload.filename.trim().chars().take(255).collect();
        if name.is_empty() {
            return Err(AppError::bad_input("file", "the file needs a name"));
        }
        let extension = extension_of(&name);
        let kind = extension.as_deref().map_or("custom", type_of_extension);
        let settings = loaded.file_upload();
        check_type(&settings, kind, extension.as_deref(), "file".into())?;
        let max = settings
            .max_bytes
            .map_or(app.config.upload_max_bytes, |m| m.max(0) as u64);
        let file = upload.content;
        let size = file
            .metadata()
            .map_err(|e| AppError::internal(anyhow::anyhow!("reading the upload: {e}")))?
            .len();
        if size > max {
            return Err(AppError::LimitExceeded {
                limit: "UPLOAD_MAX_BYTES",
                max,
                message: format!("this app takes files of at most {max} bytes"),
            });
        }
        let stored = dify
            .client
            .upload(
                tokio::fs::File::from_std(file),
                size,
                &name,
                upload.content_type.as_deref(),
                &crate::chat::dify_user(user.id),
            )
            .await
            .map_err(|error| match error {
                DifyError::Api { status: 413, .. } => AppError::LimitExceeded {
                    limit: "UPLOAD_MAX_BYTES",
                    max,
                    message: "Dify refused the file as too large".into(),
                },
                DifyError::Api { status: 415, .. } => {
                    AppError::bad_input("file", "Dify does not take this type of file")
                }
                DifyError::Api {
                    status: 400,
                    message,
                    ..
                } => AppError::bad_input("file", format!("Dify refused the file: {message}")),
                other => other.into(),
            })?;
        let record = FileRecord {
            id: FileId::new(),
            user_id: user.id,
            app_id: dify.id,
            dify_file_id: stored.id,
            name: stored.name.filter(|n| !n.is_empty()).unwrap_or(name),
            size: stored.size.unwrap_or(size as i64),
            mime_type: stored.mime_type.filter(|m| !m.is_empty()),
            extension: stored.extension.filter(|e| !e.is_empty()).or(extension),
            file_type: kind.to_owned(),
            created_at: now(),
        };
        let mut conn = app.db.get().await?;
        super::insert(&mut conn, &record).await?;
        tracing::info!(file.id = %record.id, app.id = %dify.id, bytes = record.size, "file uploaded");
        Ok((&record).into())
    }
}
