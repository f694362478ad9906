//! Typed Dify stream events (DIFY.md §5), decoded from a frame's JSON by hand so that missing,
//! null or re-typed fields in other Dify versions never lose an event: anything unrecognised
//! becomes `Event::Other` with its payload intact.

use serde_json::{Map, Value};

/// Ids Dify puts on the frames; any of them may be absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ids {
    pub conversation_id: Option<String>,
    pub message_id: Option<String>,
    pub task_id: Option<String>,
    pub workflow_run_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentThought {
    pub id: String,
    pub position: i32,
    pub thought: String,
    pub tool: Option<String>,
    pub tool_input: Option<String>,
    pub observation: Option<String>,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MessageFile {
    pub id: String,
    pub kind: String,
    pub url: Option<String>,
    pub belongs_to: Option<String>,
}

/// `message_end.metadata.usage`: the answer's tokens and price.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// A decimal string, as Dify sends prices.
    pub total_price: Option<String>,
    pub currency: Option<String>,
    /// Seconds.
    pub latency: Option<f64>,
}

impl Usage {
    /// Reads Dify's usage object; numbers sent as text are read too. `None` if it is not an
    /// object.
    pub fn from_dify(value: &Value) -> Option<Self> {
        let map = value.as_object()?;
        Some(Self {
            prompt_tokens: int(map, "prompt_tokens").unwrap_or(0),
            completion_tokens: int(map, "completion_tokens").unwrap_or(0),
            total_tokens: int(map, "total_tokens").unwrap_or(0),
            total_price: string(map, "total_price"),
            currency: string(map, "currency"),
            latency: float(map, "latency"),
        })
    }
}

/// One of `message_end.metadata.retriever_resources`: a knowledge-base passage the answer cites.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetrieverResource {
    pub position: Option<i32>,
    pub dataset_id: Option<String>,
    pub dataset_name: Option<String>,
    pub document_id: Option<String>,
    pub document_name: Option<String>,
    pub segment_id: Option<String>,
    pub score: Option<f64>,
    pub content: Option<String>,
}

impl RetrieverResource {
    /// Reads one of Dify's retriever resources; `None` if it is not an object.
    pub fn from_dify(value: &Value) -> Option<Self> {
        let map = value.as_object()?;
        Some(Self {
            position: int(map, "position").and_then(|p| i32::try_from(p).ok()),
            dataset_id: string(map, "dataset_id"),
            dataset_name: string(map, "dataset_name"),
            document_id: string(map, "document_id"),
            document_name: string(map, "document_name"),
            segment_id: string(map, "segment_id"),
            score: float(map, "score"),
            content: string(map, "content"),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `message`, `agent_message` or `text_chunk`: a piece of the answer.
    AnswerDelta(String),
    /// `message_replace` / `text_replace`: the whole answer so far (output moderation).
    AnswerReplaced(String),
    AgentThought(AgentThought),
    MessageFile(MessageFile),
    /// `message_end`: usage and retriever resources from its `metadata`, and its `files`;
    /// relayed as it came (`raw`).
    MessageEnd {
        usage: Option<Usage>,
        retriever_resources: Vec<RetrieverResource>,
        files: Vec<MessageFile>,
        raw: Value,
    },
    /// `workflow_*`, `node_*`, `iteration_*`, `loop_*`, `parallel_branch_*`, `agent_log`.
    Workflow {
        event: String,
        data: Value,
    },
    /// `workflow_finished`; also relayed as workflow progress.
    WorkflowFinished {
        status: String,
        error: Option<String>,
        outputs: Option<Value>,
        total_tokens: Option<i64>,
        data: Value,
    },
    /// `error`: terminal.
    Error {
        code: String,
        status: Option<u16>,
        message: String,
    },
    /// Anything else (tts, human input, reasoning, future events), relayed as it came.
    Other {
        event: String,
        raw: Value,
    },
}

/// A decoded frame: its event name, the event and the ids it carried.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub name: String,
    pub event: Event,
    pub ids: Ids,
}

fn string(map: &Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn non_empty(map: &Map<String, Value>, key: &str) -> Option<String> {
    string(map, key).filter(|s| !s.is_empty())
}

/// A number Dify sent as a number or as text.
fn int(map: &Map<String, Value>, key: &str) -> Option<i64> {
    let value = map.get(key)?;
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

fn float(map: &Map<String, Value>, key: &str) -> Option<f64> {
    let value = map.get(key)?;
    value
        .as_f64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

/// One of `message_end.files` (Dify's file objects, named by `related_id`, `upload_file_id` or
/// `id`); `None` without an id.
fn end_file(value: &Value) -> Option<MessageFile> {
    let map = value.as_object()?;
    let id = ["related_id", "upload_file_id", "id"]
        .iter()
        .find_map(|key| non_empty(map, key))?;
    Some(MessageFile {
        id,
        kind: non_empty(map, "type").unwrap_or_else(|| "file".into()),
        url: non_empty(map, "url").or_else(|| non_empty(map, "remote_url")),
        belongs_to: non_empty(map, "belongs_to").or_else(|| Some("assistant".into())),
    })
}

/// The items of a JSON array read with `read`, skipping what it cannot read; none if it is not
/// an array.
fn list<T>(value: Option<&Value>, read: impl Fn(&Value) -> Option<T>) -> Vec<T> {
    value
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(read).collect())
        .unwrap_or_default()
}

/// The longest Dify id kept (Dify's are UUIDs; the columns hold 64): a longer one is not an id
/// Dify sends, and storing it would fail every write of the answer.
pub const ID_MAX: usize = 64;

fn id(map: &Map<String, Value>, key: &str) -> Option<String> {
    keep_id(string(map, key))
}

fn keep_id(id: Option<String>) -> Option<String> {
    id.filter(|id| !id.is_empty() && id.len() <= ID_MAX)
}

const WORKFLOW_PREFIXES: &[&str] = &[
    "workflow_",
    "node_",
    "iteration_",
    "loop_",
    "parallel_branch_",
];

/// Decodes one `data:` payload. `Err` only when it is not a JSON object with an `event`.
pub fn decode(data: &str) -> Result<StreamEvent, String> {
    match text_frame(data) {
        Some(event) => Ok(event),
        None => decode_tree(data),
    }
}

/// The fields of a frame carrying a piece of the answer (`message`, `agent_message`: nearly
/// every frame of a stream).
#[derive(serde::Deserialize)]
struct TextFrame {
    event: String,
    answer: Option<String>,
    conversation_id: Option<String>,
    message_id: Option<String>,
    task_id: Option<String>,
    workflow_run_id: Option<String>,
}

/// A text frame read straight into its fields, without building a JSON tree; `None` for any
/// other frame, or one whose fields are not typed as Dify types them (the tree reads those).
fn text_frame(data: &str) -> Option<StreamEvent> {
    let frame: TextFrame = serde_json::from_str(data).ok()?;
    if !matches!(frame.event.as_str(), "message" | "agent_message") {
        return None;
    }
    Some(StreamEvent {
        event: Event::AnswerDelta(frame.answer.unwrap_or_default()),
        ids: Ids {
            conversation_id: keep_id(frame.conversation_id),
            message_id: keep_id(frame.message_id),
            task_id: keep_id(frame.task_id),
            workflow_run_id: keep_id(frame.workflow_run_id),
        },
        name: frame.event,
    })
}

fn decode_tree(data: &str) -> Result<StreamEvent, String> {
    let raw: Value = serde_json::from_str(data).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut map) = raw else {
        return Err("not a JSON object".into());
    };
    let name = string(&map, "event").ok_or("no event field")?;
    let ids = Ids {
        conversation_id: id(&map, "conversation_id"),
        message_id: id(&map, "message_id"),
        task_id: id(&map, "task_id"),
        workflow_run_id: id(&map, "workflow_run_id"),
    };
    let data_text = |map: &Map<String, Value>| {
        map.get("data")
            .and_then(Value::as_object)
            .and_then(|d| string(d, "text"))
            .unwrap_or_default()
    };
    let event = match name.as_str() {
        "message" | "agent_message" => {
            Event::AnswerDelta(string(&map, "answer").unwrap_or_default())
        }
        "text_chunk" => Event::AnswerDelta(data_text(&map)),
        "message_replace" => Event::AnswerReplaced(string(&map, "answer").unwrap_or_default()),
        "text_replace" => Event::AnswerReplaced(data_text(&map)),
        "agent_thought" => Event::AgentThought(AgentThought {
            id: string(&map, "id").unwrap_or_default(),
            position: int(&map, "position")
                .and_then(|p| i32::try_from(p).ok())
                .unwrap_or(0),
            thought: string(&map, "thought").unwrap_or_default(),
            tool: non_empty(&map, "tool"),
            tool_input: non_empty(&map, "tool_input"),
            observation: non_empty(&map, "observation"),
            files: list(map.get("message_files"), |f| f.as_str().map(str::to_owned)),
        }),
        "message_file" => Event::MessageFile(MessageFile {
            id: string(&map, "id").unwrap_or_default(),
            kind: string(&map, "type").unwrap_or_else(|| "file".into()),
            url: non_empty(&map, "url"),
            belongs_to: non_empty(&map, "belongs_to"),
        }),
        "message_end" => {
            let metadata = map.get("metadata");
            let usage = metadata
                .and_then(|m| m.get("usage"))
                .and_then(Usage::from_dify);
            let retriever_resources = list(
                metadata.and_then(|m| m.get("retriever_resources")),
                RetrieverResource::from_dify,
            );
            let files = list(map.get("files"), end_file);
            Event::MessageEnd {
                usage,
                retriever_resources,
                files,
                raw: Value::Object(map),
            }
        }
        "workflow_finished" => {
            let d = match map.remove("data") {
                Some(Value::Object(d)) => d,
                _ => Map::new(),
            };
            Event::WorkflowFinished {
                status: string(&d, "status").unwrap_or_default(),
                error: non_empty(&d, "error"),
                outputs: d.get("outputs").filter(|v| !v.is_null()).cloned(),
                total_tokens: d.get("total_tokens").and_then(Value::as_i64),
                data: Value::Object(d),
            }
        }
        "error" => Event::Error {
            code: non_empty(&map, "code").unwrap_or_else(|| "internal_server_error".into()),
            status: map
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok()),
            message: non_empty(&map, "message").unwrap_or_else(|| "Dify reported an error".into()),
        },
        other if other == "agent_log" || WORKFLOW_PREFIXES.iter().any(|p| other.starts_with(p)) => {
            Event::Workflow {
                event: other.to_owned(),
                data: map.remove("data").unwrap_or(Value::Object(Map::new())),
            }
        }
        other => Event::Other {
            event: other.to_owned(),
            raw: Value::Object(map),
        },
    };
    Ok(StreamEvent { name, event, ids })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_json_styles_decode_alike() {
        let compact = decode(r#"{"event":"message","conversation_id":"c","message_id":"m","task_id":"t","answer":"你好"}"#).unwrap();
        let legacy = decode(r#"{"event": "message", "conversation_id": "c", "message_id": "m", "task_id": "t", "answer": "\u4f60\u597d"}"#).unwrap();
        assert_eq!(compact.event, Event::AnswerDelta("你好".into()));
        assert_eq!(compact.event, legacy.event);
        assert_eq!(compact.ids, legacy.ids);
        let emoji = decode(r#"{"event": "message", "answer": "\ud83d\ude00"}"#).unwrap();
        assert_eq!(emoji.event, Event::AnswerDelta("😀".into()));
    }

    #[test]
    fn ids_longer_than_their_columns_are_not_kept() {
        let long = "x".repeat(ID_MAX + 1);
        let e = decode(&format!(
            r#"{{"event":"message","task_id":"{long}","message_id":"{}","answer":"a"}}"#,
            "m".repeat(ID_MAX)
        ))
        .unwrap();
        assert_eq!(e.ids.task_id, None);
        assert_eq!(e.ids.message_id.map(|id| id.len()), Some(ID_MAX));
    }

    #[test]
    fn workflow_and_unknown_events_keep_their_payload() {
        let e = decode(r#"{"event":"node_started","workflow_run_id":"w","task_id":"t","data":{"node_id":"1","title":"开始"}}"#).unwrap();
        assert!(
            matches!(&e.event, Event::Workflow { event, data } if event == "node_started" && data["title"] == "开始")
        );
        assert_eq!(e.ids.workflow_run_id.as_deref(), Some("w"));
        let e = decode(r#"{"event":"tts_message","audio":"AAA"}"#).unwrap();
        assert!(
            matches!(&e.event, Event::Other { event, raw } if event == "tts_message" && raw["audio"] == "AAA")
        );
    }

    #[test]
    fn message_end_metadata_is_typed_reading_numbers_sent_as_text() {
        let e = decode(
            r#"{"event":"message_end","metadata":{
                "usage":{"prompt_tokens":"12","completion_tokens":3,"total_tokens":15,"total_price":0.5,"currency":"USD","latency":"1.5","prompt_unit_price":"0.1"},
                "retriever_resources":[{"position":1,"document_name":"a.pdf","score":0.9,"hit_count":3},"junk"]},
              "files":[{"related_id":"f1","type":"image","url":"u"},{"upload_file_id":"f2","remote_url":"r","belongs_to":"user"},{"type":"image"}]}"#,
        )
        .unwrap();
        let Event::MessageEnd {
            usage,
            retriever_resources,
            files,
            raw,
        } = e.event
        else {
            panic!("not a message_end: {:?}", e.event);
        };
        assert_eq!(raw["metadata"]["usage"]["total_tokens"], 15);
        let file = |id: &str, kind: &str, url: &str, belongs_to: &str| MessageFile {
            id: id.into(),
            kind: kind.into(),
            url: Some(url.into()),
            belongs_to: Some(belongs_to.into()),
        };
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 3,
                total_tokens: 15,
                total_price: Some("0.5".into()),
                currency: Some("USD".into()),
                latency: Some(1.5),
            })
        );
        assert_eq!(
            retriever_resources,
            [RetrieverResource {
                position: Some(1),
                document_name: Some("a.pdf".into()),
                score: Some(0.9),
                ..RetrieverResource::default()
            }]
        );
        assert_eq!(
            files,
            [
                file("f1", "image", "u", "assistant"),
                file("f2", "file", "r", "user"),
            ]
        );
        let bare = decode(r#"{"event":"message_end","metadata":{"usage":null},"files":null}"#);
        assert!(matches!(
            bare.unwrap().event,
            Event::MessageEnd { usage: None, retriever_resources, files, .. }
                if retriever_resources.is_empty() && files.is_empty()
        ));
    }

    /// Text frames read without the JSON tree decode exactly as through it: every frame of
    /// every capture, and frames typed unlike Dify's.
    #[test]
    fn text_frames_decode_as_through_the_tree() {
        let mut frames: Vec<String> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dify"))
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|e| e == "sse"))
                .flat_map(|path| {
                    let text = std::fs::read_to_string(path).unwrap();
                    text.lines()
                        .filter_map(|line| line.strip_prefix("data:"))
                        .map(|data| data.trim_start().to_owned())
                        .collect::<Vec<_>>()
                })
                .collect();
        assert!(frames.len() > 50, "{} frames", frames.len());
        frames.extend(
            [
                r#"{"event":"message","answer":null,"task_id":""}"#,
                r#"{"event":"message","answer":7,"task_id":12}"#,
                r#"{"event":"agent_message","answer":"a","answer":"b"}"#,
                r#"{"event":"message","message_id":["x"],"answer":"a"}"#,
                r#"{"event":"message"}"#,
            ]
            .map(str::to_owned),
        );
        let mut fast = 0;
        for data in &frames {
            fast += usize::from(text_frame(data).is_some());
            assert_eq!(decode(data), decode_tree(data), "{data}");
        }
        assert!(fast > 20, "{fast} frames read without the tree");
    }

    #[test]
    fn errors_and_garbage() {
        let e = decode(
            r#"{"event":"error","code":"completion_request_error","status":400,"message":"boom"}"#,
        )
        .unwrap();
        assert_eq!(
            e.event,
            Event::Error {
                code: "completion_request_error".into(),
                status: Some(400),
                message: "boom".into()
            }
        );
        assert!(decode("not json").is_err());
        assert!(decode("[1]").is_err());
        assert!(decode(r#"{"answer":"x"}"#).is_err());
    }
}
