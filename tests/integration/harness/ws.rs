//! A GraphQL WebSocket client over tokio-tungstenite, for both subprotocols.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub const TRANSPORT_WS: &str = "graphql-transport-ws";
pub const LEGACY_WS: &str = "graphql-ws";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct WsClient {
    socket: Socket,
    pub protocol: &'static str,
    next_id: u32,
}

/// What the server said about one operation.
#[derive(Debug)]
pub enum OpMessage {
    Next(Value),
    Error(Value),
    Complete,
}

impl WsClient {
    /// Opens the socket; with `init`, sends `connection_init` and waits for the ack
    /// (`Err` carries what came instead: a close code or an error message).
    pub async fn connect(url: &str, protocol: &str, init: Option<Value>) -> Result<Self, String> {
        Self::connect_with_header(url, protocol, init, None).await
    }

    pub async fn connect_with_header(
        url: &str,
        protocol: &str,
        init: Option<Value>,
        authorization: Option<&str>,
    ) -> Result<Self, String> {
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
        if let Some(auth) = authorization {
            request
                .headers_mut()
                .insert("authorization", auth.parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| e.to_string())?;
        let protocol = if protocol == LEGACY_WS {
            LEGACY_WS
        } else {
            TRANSPORT_WS
        };
        let mut client = Self {
            socket,
            protocol,
            next_id: 0,
        };
        if let Some(payload) = init {
            client
                .send(json!({ "type": "connection_init", "payload": payload }))
                .await;
            loop {
                match client.recv().await {
                    Some(Ok(v)) if v["type"] == "connection_ack" => break,
                    Some(Ok(v)) if v["type"] == "ka" => continue,
                    Some(Ok(v)) => return Err(format!("message {v}")),
                    Some(Err(close)) => return Err(close),
                    None => return Err("closed".into()),
                }
            }
        }
        Ok(client)
    }

    pub async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("send");
    }

    /// The next JSON message, or `Err("close <code> <reason>")` when the server closed.
    pub async fn recv(&mut self) -> Option<Result<Value, String>> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .expect("no WebSocket message within 20 s")?;
            match message {
                Ok(Message::Text(text)) => {
                    return Some(Ok(serde_json::from_str(&text).expect("JSON message")));
                }
                Ok(Message::Close(frame)) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Some(Err(format!("close {code} {reason}")));
                }
                Ok(_) => continue,
                Err(e) => return Some(Err(format!("error {e}"))),
            }
        }
    }

    /// Starts a subscription and returns its id.
    pub async fn subscribe(&mut self, query: &str, variables: Value) -> String {
        self.next_id += 1;
        let id = self.next_id.to_string();
        let kind = if self.protocol == LEGACY_WS {
            "start"
        } else {
            "subscribe"
        };
        self.send(json!({ "id": id, "type": kind, "payload": { "query": query, "variables": variables } })).await;
        id
    }

    pub async fn unsubscribe(&mut self, id: &str) {
        let kind = if self.protocol == LEGACY_WS {
            "stop"
        } else {
            "complete"
        };
        self.send(json!({ "id": id, "type": kind })).await;
    }

    /// The next message about an operation.
    pub async fn next_op(&mut self) -> OpMessage {
        loop {
            let message = self.recv().await.expect("socket open").expect("no close");
            match message["type"].as_str() {
                Some("next" | "data") => return OpMessage::Next(message["payload"].clone()),
                Some("error") => return OpMessage::Error(message["payload"].clone()),
                Some("complete") => return OpMessage::Complete,
                _ => continue, // ka, ping
            }
        }
    }

    /// Every payload of a subscription until it completes (or errors).
    pub async fn collect(&mut self) -> Result<Vec<Value>, Value> {
        let mut payloads = Vec::new();
        loop {
            match self.next_op().await {
                OpMessage::Next(payload) => {
                    if payload.get("errors").is_some_and(|e| !e.is_null())
                        && payload["data"].is_null()
                    {
                        return Err(payload);
                    }
                    payloads.push(payload);
                }
                OpMessage::Error(errors) => return Err(errors),
                OpMessage::Complete => return Ok(payloads),
            }
        }
    }

    /// The `extensions.code` of an operation that was refused (in either protocol's shape).
    pub async fn refused_code(&mut self) -> String {
        let errors = self
            .collect()
            .await
            .expect_err("the operation should be refused");
        let errors = errors.get("errors").unwrap_or(&errors);
        errors[0]["extensions"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub async fn close(mut self) {
        let _ = self
            .socket
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}
