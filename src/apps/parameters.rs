//! Dify's `/parameters` answer, typed: what a frontend needs to render an app (opening
//! statement, starter questions, feature flags, the input form, upload settings), and the check
//! of a turn's `inputs` against the form before anything is saved or sent.

use async_graphql::{Json, SimpleObject};
use serde_json::{Map, Value};

use crate::error::AppError;

/// How an app presents itself and what it accepts, from Dify's `/parameters`.
#[derive(SimpleObject, Clone, Debug)]
pub struct AppParameters {
    /// Shown before the first turn.
    pub opening_statement: Option<String>,
    /// Starter questions shown before the first turn.
    pub suggested_questions: Vec<String>,
    /// Whether `suggestedQuestions(messageId)` offers follow-ups after an answer.
    pub suggested_questions_after_answer: bool,
    /// Whether the app turns speech into text (Dify's `/audio-to-text`).
    pub speech_to_text: bool,
    /// Whether the app reads answers aloud (Dify's `/text-to-audio`).
    pub text_to_speech: bool,
    /// Whether answers cite their sources (`retrieverResources`).
    pub retriever_resource: bool,
    /// The app's input variables, in Dify's order; send values in `ChatInput.inputs`.
    pub user_input_form: Vec<InputField>,
    /// What may be attached to a turn.
    pub file_upload: FileUploadSettings,
    /// Dify's answer, untouched.
    pub raw: Json<Value>,
}

/// One input variable of an app's form.
#[derive(SimpleObject, Clone, Debug)]
pub struct InputField {
    /// The key to use in `ChatInput.inputs`.
    pub variable: String,
    /// What to show next to the control.
    pub label: String,
    /// Dify's control type: `text-input`, `paragraph`, `select`, `number`, `checkbox`, `file`,
    /// `file-list`, `json_object`, … (unknown types are kept as Dify names them).
    #[graphql(name = "type")]
    pub kind: String,
    /// A turn without a non-empty value is refused (`BAD_USER_INPUT`, field `inputs.<variable>`).
    pub required: bool,
    /// Most characters for text inputs.
    pub max_length: Option<i32>,
    /// The choices of a `select`; empty otherwise.
    pub options: Vec<String>,
    /// The value to prefill, if Dify has one.
    pub default: Option<Json<Value>>,
    /// Dify's description of the field, untouched (for control types rechat does not know).
    pub raw: Json<Value>,
}

/// What an app accepts as attachments.
#[derive(SimpleObject, Clone, Debug, Default)]
pub struct FileUploadSettings {
    /// Whether the app takes attachments at all.
    pub enabled: bool,
    /// `image`, `document`, `audio`, `video`, `custom`.
    pub allowed_file_types: Vec<String>,
    /// For `custom`, e.g. `[".csv"]`.
    pub allowed_file_extensions: Vec<String>,
    /// `local_file`, `remote_url`.
    pub allowed_transfer_methods: Vec<String>,
    /// Most files per turn.
    pub number_limit: Option<i32>,
    /// The largest file, in bytes: the smaller of Dify's limit and `UPLOAD_MAX_BYTES`.
    pub max_bytes: Option<i64>,
}

fn text(value: &Value, key: &str) -> Option<String> {
    value
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|item| match item {
                    Value::String(s) => Some(s.clone()),
                    // Older Dify versions send select options as objects.
                    other => text(other, "value").or_else(|| text(other, "label")),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn enabled(value: &Value, key: &str) -> bool {
    value
        .get(key)
        .and_then(|feature| feature.get("enabled"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn integer(value: Option<&Value>) -> Option<i64> {
    value.and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
    })
}

impl AppParameters {
    /// Parses Dify's answer; never fails: what is missing is empty, unknown controls are kept.
    pub fn parse(raw: Value, upload_max_bytes: u64) -> Self {
        let user_input_form = raw
            .get("user_input_form")
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(InputField::parse).collect())
            .unwrap_or_default();
        Self {
            opening_statement: text(&raw, "opening_statement"),
            suggested_questions: strings(raw.get("suggested_questions")),
            suggested_questions_after_answer: enabled(&raw, "suggested_questions_after_answer"),
            speech_to_text: enabled(&raw, "speech_to_text"),
            text_to_speech: enabled(&raw, "text_to_speech"),
            retriever_resource: enabled(&raw, "retriever_resource"),
            user_input_form,
            file_upload: FileUploadSettings::parse(&raw, upload_max_bytes),
            raw: Json(raw),
        }
    }

    /// Checks a turn's `inputs` against the form, the way Dify does: required variables present
    /// and not empty, select values among the options, text within its length, numbers
    /// numeric. `BAD_USER_INPUT` with `extensions.field` = `inputs.<variable>`.
    pub fn check_inputs(&self, inputs: &Map<String, Value>) -> Result<(), AppError> {
        for field in &self.user_input_form {
            let refuse = |message: String| {
                AppError::bad_input_owned(format!("inputs.{}", field.variable), message)
            };
            let value = inputs.get(&field.variable).filter(|v| !is_empty(v));
            let Some(value) = value else {
                if field.required {
                    return Err(refuse(format!("{} is required", field.label)));
                }
                continue;
            };
            match field.kind.as_str() {
                "text-input" | "paragraph" | "select" => {
                    let Some(text) = value.as_str() else {
                        return Err(refuse(format!("{} must be text", field.label)));
                    };
                    if let Some(max) = field.max_length
                        && text.chars().count() > max.max(0) as usize
                    {
                        return Err(refuse(format!(
                            "{} may have at most {max} characters",
                            field.label
                        )));
                    }
                    if field.kind == "select" && !field.options.iter().any(|o| o == text) {
                        return Err(refuse(format!(
                            "{} must be one of: {}",
                            field.label,
                            field.options.join(", ")
                        )));
                    }
                }
                "number" => {
                    let numeric = value.is_number()
                        || value
                            .as_str()
                            .is_some_and(|s| s.trim().parse::<f64>().is_ok());
                    if !numeric {
                        return Err(refuse(format!("{} must be a number", field.label)));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

impl InputField {
    /// One item of `user_input_form`: a single-key object keyed by the control type.
    fn parse(item: &Value) -> Option<Self> {
        let (kind, spec) = item.as_object()?.iter().next()?;
        let variable = text(spec, "variable")?;
        Some(Self {
            label: text(spec, "label").unwrap_or_else(|| variable.clone()),
            variable,
            kind: kind.clone(),
            required: spec
                .get("required")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_length: integer(spec.get("max_length"))
                .filter(|n| *n > 0)
                .map(|n| n.min(i32::MAX as i64) as i32),
            options: if kind == "select" {
                strings(spec.get("options"))
            } else {
                Vec::new()
            },
            default: spec
                .get("default")
                .filter(|v| !is_empty(v))
                .cloned()
                .map(Json),
            raw: Json(spec.clone()),
        })
    }
}

impl FileUploadSettings {
    fn parse(raw: &Value, upload_max_bytes: u64) -> Self {
        let Some(upload) = raw.get("file_upload") else {
            return Self::default();
        };
        // Dify ≥ 0.10 describes every file type at the top level; older versions only images.
        let image = upload.get("image");
        let image_enabled = image
            .and_then(|i| i.get("enabled"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut allowed_file_types = strings(upload.get("allowed_file_types"));
        if allowed_file_types.is_empty() && image_enabled {
            allowed_file_types.push("image".into());
        }
        let mut allowed_transfer_methods = strings(upload.get("allowed_file_upload_methods"));
        if allowed_transfer_methods.is_empty() {
            allowed_transfer_methods = strings(image.and_then(|i| i.get("transfer_methods")));
        }
        let enabled = upload
            .get("enabled")
            .and_then(Value::as_bool)
            .unwrap_or(image_enabled);
        let number_limit = integer(upload.get("number_limits"))
            .or_else(|| integer(image.and_then(|i| i.get("number_limits"))))
            .map(|n| n.clamp(0, i32::MAX as i64) as i32);
        // Dify's limits are in MB.
        let dify_mb = integer(
            raw.get("system_parameters")
                .and_then(|s| s.get("file_size_limit")),
        );
        let dify_bytes = dify_mb.map(|mb| mb.max(0) as u64 * 1024 * 1024);
        let max = dify_bytes.map_or(upload_max_bytes, |d| d.min(upload_max_bytes));
        Self {
            enabled,
            allowed_file_types,
            allowed_file_extensions: strings(upload.get("allowed_file_extensions")),
            allowed_transfer_methods,
            number_limit,
            max_bytes: Some(max.min(i64::MAX as u64) as i64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parameters() -> AppParameters {
        AppParameters::parse(
            json!({
                "opening_statement": "Hi! Ask me about leave.",
                "suggested_questions": ["How many days do I have?"],
                "suggested_questions_after_answer": { "enabled": true },
                "speech_to_text": { "enabled": false },
                "retriever_resource": { "enabled": true },
                "user_input_form": [
                    { "text-input": { "label": "Name", "variable": "name", "required": true, "max_length": 5, "default": "" } },
                    { "select": { "label": "Team", "variable": "team", "required": false, "options": ["a", "b"], "default": "a" } },
                    { "number": { "label": "Age", "variable": "age", "required": false } },
                    { "rating-stars": { "label": "Mood", "variable": "mood", "required": false, "stars": 5 } },
                    { "paragraph": { "label": "no variable" } }
                ],
                "file_upload": {
                    "enabled": true,
                    "allowed_file_types": ["image", "document"],
                    "allowed_file_extensions": [],
                    "allowed_file_upload_methods": ["local_file", "remote_url"],
                    "number_limits": 3
                },
                "system_parameters": { "file_size_limit": 50 }
            }),
            15 << 20,
        )
    }

    #[test]
    fn every_control_is_kept_and_typed() {
        let p = parameters();
        assert_eq!(
            p.opening_statement.as_deref(),
            Some("Hi! Ask me about leave.")
        );
        assert!(p.suggested_questions_after_answer && p.retriever_resource && !p.speech_to_text);
        let kinds: Vec<&str> = p.user_input_form.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(kinds, ["text-input", "select", "number", "rating-stars"]);
        let mood = &p.user_input_form[3];
        assert_eq!(
            mood.raw.0["stars"], 5,
            "unknown controls keep their description"
        );
        assert_eq!(p.user_input_form[1].options, ["a", "b"]);
        assert!(
            p.user_input_form[0].default.is_none(),
            "an empty default is none"
        );
        assert_eq!(p.file_upload.number_limit, Some(3));
        assert_eq!(p.file_upload.max_bytes, Some(15 << 20), "the smaller limit");
    }

    #[test]
    fn inputs_are_checked_like_dify_checks_them() {
        let p = parameters();
        let check = |inputs: Value| {
            p.check_inputs(inputs.as_object().unwrap())
                .map_err(|e| match e {
                    AppError::BadUserInput { field, .. } => field,
                    other => panic!("{other:?}"),
                })
        };
        assert_eq!(check(json!({})).unwrap_err(), "inputs.name");
        assert_eq!(check(json!({ "name": "  " })).unwrap_err(), "inputs.name");
        assert_eq!(
            check(json!({ "name": "toolong" })).unwrap_err(),
            "inputs.name"
        );
        assert_eq!(
            check(json!({ "name": "ada", "team": "c" })).unwrap_err(),
            "inputs.team"
        );
        assert_eq!(
            check(json!({ "name": "ada", "age": "x" })).unwrap_err(),
            "inputs.age"
        );
        assert!(check(json!({ "name": "ada", "team": "b", "age": "42", "mood": 3 })).is_ok());
        assert!(check(json!({ "name": "ada", "age": 42.5 })).is_ok());
    }

    #[test]
    fn old_image_only_upload_settings_are_understood() {
        let p = AppParameters::parse(
            json!({ "file_upload": { "image": { "enabled": true, "number_limits": 2, "transfer_methods": ["remote_url"] } } }),
            1 << 20,
        );
        assert!(p.file_upload.enabled);
        assert_eq!(p.file_upload.allowed_file_types, ["image"]);
        assert_eq!(p.file_upload.allowed_transfer_methods, ["remote_url"]);
        assert_eq!(p.file_upload.number_limit, Some(2));
    }
}
