use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestApp, error_code};

#[tokio::test(flavor = "multi_thread")]
async fn post_accepts_only_single_json_requests() {
    let app = TestApp::spawn().await;
    let post = |content_type: &'static str, body: String| {
        app.http
            .post(app.url("/graphql"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let plain = post("text/plain", r#"{"query":"{ __typename }"}"#.into())
        .await
        .unwrap();
    assert_eq!(plain.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let form = post(
        "application/x-www-form-urlencoded",
        "query=%7B__typename%7D".into(),
    )
    .await
    .unwrap();
    assert_eq!(form.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Multipart is the upload spec's, and only with a token (see files.rs).
    let multipart = post("multipart/form-data; boundary=x", "--x--".into())
        .await
        .unwrap();
    assert_eq!(multipart.status(), StatusCode::UNAUTHORIZED);

    let malformed = post("application/json", "{\"query\": ".into())
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        error_code(&malformed.json::<Value>().await.unwrap()),
        "BAD_USER_INPUT"
    );

    let batch = post(
        "application/json; charset=utf-8",
        r#"[{"query":"{ __typename }"}]"#.into(),
    )
    .await
    .unwrap();
    assert_eq!(batch.status(), StatusCode::BAD_REQUEST);

    let oversize = format!(
        r#"{{"query":"{{ __typename }}","variables":{{"x":"{}"}}}}"#,
        "x".repeat(rechat::http::BODY_LIMIT)
    );
    assert_eq!(
        post("application/json", oversize).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );

    let ok = post(
        "application/json; charset=utf-8",
        r#"{"query":"{ __typename }"}"#.into(),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(ok.headers().contains_key("x-request-id"));
    assert_eq!(
        ok.json::<Value>().await.unwrap()["data"]["__typename"],
        "Query"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn get_runs_queries_but_never_mutations() {
    let app = TestApp::spawn().await;
    let user = app.register("ada@example.com").await;
    let get = |query: &str| {
        app.http
            .get(app.url("/graphql"))
            .query(&[("query", query)])
            .bearer_auth(user.token.as_deref().unwrap())
            .send()
    };
    let me = get("{ me { email } }").await.unwrap();
    assert_eq!(
        me.json::<Value>().await.unwrap()["data"]["me"]["email"],
        "ada@example.com"
    );

    let mutation = get(
        r#"mutation { register(input: {email: "x@example.com", password: "12345678"}) { token } }"#,
    )
    .await
    .unwrap();
    assert_eq!(mutation.status(), StatusCode::METHOD_NOT_ALLOWED);
    let users = app.sql_strings("SELECT email AS value FROM users").await;
    assert_eq!(users, ["ada@example.com"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn graphiql_schema_and_health_endpoints() {
    let app = TestApp::spawn().await;
    let page = app
        .http
        .get(app.url("/graphql"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("graphiql") || html.contains("GraphiQL"));
    assert!(html.contains("/graphql"));

    // Everything GraphiQL needs comes from rechat itself: it works offline.
    let sources: Vec<&str> = html
        .split(['"', '\''])
        .filter(|part| part.ends_with(".js") || part.ends_with(".css"))
        .collect();
    assert_eq!(sources.len(), 4, "{sources:?}");
    for source in sources {
        // A CDN address here means build.rs could not fetch the bundle (it warned).
        assert!(source.starts_with("/graphiql/"), "{source}");
        let asset = app.http.get(app.url(source)).send().await.unwrap();
        assert_eq!(asset.status(), StatusCode::OK, "{source}");
        let content_type = asset.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            content_type.starts_with("text/"),
            "{source}: {content_type}"
        );
        assert!(asset.bytes().await.unwrap().len() > 10_000, "{source}");
    }
    assert!(!html.contains("https://"), "no external resource");
    let missing = app
        .http
        .get(app.url("/graphiql/nothing.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let sdl = app.get_text("/schema.graphql").await;
    assert_eq!(sdl, rechat::graphql::sdl());
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // The database goes away: ready no more, with a reason; alive still.
    app.sql(&format!("DROP DATABASE `{}`", app.db.name)).await;
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.json::<Value>().await.unwrap()["reason"].is_string());
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn depth_and_complexity_are_limited() {
    let app = TestApp::spawn().await;
    let mut deep = String::from("name");
    for _ in 0..20 {
        deep = format!("ofType {{ {deep} }}");
    }
    let answer = app
        .gql(
            None,
            &format!("{{ __schema {{ types {{ fields {{ type {{ {deep} }} }} }} }} }}"),
            json!({}),
        )
        .await;
    assert!(answer["data"].is_null(), "{answer}");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("nested"),
        "{answer}"
    );

    // GraphiQL's own introspection query stays within the limits.
    let introspection = app.gql(None, INTROSPECTION, json!({})).await;
    assert!(introspection["errors"].is_null(), "{introspection}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_allows_only_configured_origins() {
    let app = TestApp::spawn().await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/graphql"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "accept,authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for header in ["accept", "authorization", "content-type"] {
        assert!(headers.contains(header), "{header} in {headers}");
    }
    let refused = preflight("https://evil.example.com").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

const INTROSPECTION: &str = r#"
query IntrospectionQuery {
  __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types { ...FullType }
    directives { name description locations args { ...InputValue } }
  }
}
fragment FullType on __Type {
  kind name description
  fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason }
  inputFields { ...InputValue }
  interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
  possibleTypes { ...TypeRef }
}
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type {
  kind name
  ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } }
}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_json_unless_the_client_asks_for_graphql_response_json() {
    let app = TestApp::spawn().await;
    let post = |accept: Option<&'static str>| {
        let mut request = app
            .http
            .post(app.url("/graphql"))
            .json(&json!({ "query": "{ __typename }" }));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.send()
    };
    for (accept, expected) in [
        (Some("application/json"), "application/json"),
        (None, "application/json"),
        (
            Some("application/graphql-response+json, application/json;q=0.9"),
            "application/graphql-response+json",
        ),
    ] {
        let response = post(accept).await.unwrap();
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with(expected),
            "{accept:?}: {content_type}"
        );
    }
    // An allowed browser origin can read the request id of an answer.
    let response = app
        .http
        .post(app.url("/graphql"))
        .header("origin", "https://app.example.com")
        .json(&json!({ "query": "{ __typename }" }))
        .send()
        .await
        .unwrap();
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("x-request-id"), "{exposed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrades_from_other_browser_origins_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = TestApp::spawn().await;
    let connect = |origin: Option<&'static str>| {
        let mut request = app.ws_url().into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
    };
    let refused = connect(Some("https://evil.example.com")).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    assert!(connect(Some("https://app.example.com")).await.is_ok());
    assert!(connect(None).await.is_ok(), "no Origin: not a browser");
}

#[tokio::test(flavor = "multi_thread")]
async fn aliases_directives_and_page_sizes_are_limited_before_execution() {
    let app = TestApp::spawn().await;
    let user = app.register("cost@example.com").await;
    let aliases = |n: usize| {
        let fields: Vec<String> = (0..n).map(|i| format!("a{i}: me {{ id }}")).collect();
        format!("{{ {} }}", fields.join(" "))
    };
    let answer = user.gql(&aliases(15), json!({})).await;
    assert!(answer["errors"].is_null(), "{answer}");
    let answer = user.gql(&aliases(16), json!({})).await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT");
    // Aliases inside a fragment count each time it is spread: 4 × 3 + 4 = 16.
    let spread = "fragment F on Query { a: me { id } b: me { id } c: me { id } d: me { id } } \
                  { ...F w: __typename x: __typename ... on Query { ...F } y: __typename z: __typename \
                  ...G } fragment G on Query { ...F }";
    assert_eq!(
        error_code(&user.gql(spread, json!({})).await),
        "BAD_USER_INPUT"
    );
    let includes: Vec<String> = (0..51).map(|_| "@include(if: true)".into()).collect();
    let answer = user
        .gql(
            &format!("{{ me {} {{ id }} }}", includes.join(" ")),
            json!({}),
        )
        .await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT");
    // A fragment cycle is refused by validation, not looped over.
    let cycle = user
        .gql("fragment A on Query { ...A } { ...A }", json!({}))
        .await;
    assert!(!cycle["errors"].is_null(), "{cycle}");

    // Page sizes count: 100 conversations × 100 messages each is refused …
    let paging =
        "{ conversations(first: 100) { nodes { messages(first: 100) { nodes { content } } } } }";
    let answer = user.gql(paging, json!({})).await;
    assert!(
        answer["data"].is_null() && !answer["errors"].is_null(),
        "{answer}"
    );
    // … and so is the amplification that ran before: the same paging under many aliases.
    let amplified: Vec<String> = (0..840)
        .map(|i| format!("c{i}: conversations(first: 100) {{ nodes {{ messages(first: 100) {{ nodes {{ content }} }} }} }}"))
        .collect();
    let answer = user
        .gql(&format!("{{ {} }}", amplified.join(" ")), json!({}))
        .await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT");
    // … while what a chat frontend asks for passes.
    let ordinary = "{ me { id email } conversations(first: 20) { totalCount pageInfo { hasNextPage endCursor } \
                    nodes { id title isPinned updatedAt messages(last: 20) { nodes { id role content status createdAt } } } } }";
    let answer = user.gql(ordinary, json!({})).await;
    assert!(answer["errors"].is_null(), "{answer}");
}

/// Reads from a raw connection until the server closes it; `Err` if it is still open after
/// `within`. Returns what was read.
async fn closed_within(
    tcp: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut read = Vec::new();
    let outcome = tokio::time::timeout(within, async {
        let mut buffer = [0u8; 4096];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&read).into_owned();
    outcome
        .map(|()| text.clone())
        .map_err(|_| format!("still open; read {text:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_http_clients_are_disconnected() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    // Tests use a 2 s header-read and body timeout (15 s and 30 s in production).
    let app = TestApp::spawn().await;

    // Headers dribbled slowly never complete a request.
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: rechat\r\n")
        .await
        .unwrap();
    let dribble = async {
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow
                .write_all(format!("X-Slow-{i}: yes\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let started = tokio::time::Instant::now();
    dribble.await;
    let closed = closed_within(&mut slow, Duration::from_secs(3)).await;
    assert!(closed.is_ok(), "dribbled headers: {closed:?}");
    assert!(started.elapsed() < Duration::from_secs(7));

    // A kept-alive connection that sends nothing more is closed.
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: rechat\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut idle, Duration::from_secs(4))
        .await
        .expect("idle connection closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A body announced and never sent is answered 408.
    let mut stalled = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stalled
        .write_all(b"POST /graphql HTTP/1.1\r\nHost: rechat\r\nContent-Type: application/json\r\nContent-Length: 200000\r\n\r\n{\"query\":")
        .await
        .unwrap();
    let answer = closed_within(&mut stalled, Duration::from_secs(5))
        .await
        .expect("stalled body ends");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_max_connections_wait_for_a_free_one() {
    use std::time::Duration;
    let app = TestApp::spawn_with(|c| c.max_connections = 2).await;
    let holders = [
        tokio::net::TcpStream::connect(app.addr).await.unwrap(),
        tokio::net::TcpStream::connect(app.addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = reqwest::Client::new()
        .get(app.url("/healthz"))
        .timeout(Duration::from_millis(700))
        .send()
        .await;
    assert!(waiting.is_err(), "served beyond the cap: {waiting:?}");
    drop(holders);
    let served = reqwest::Client::new()
        .get(app.url("/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("served once a connection is free");
    assert_eq!(served.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn websockets_are_pinged_and_dead_peers_dropped() {
    use futures::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    // Tests ping every second (every 30 s in production).
    let app = TestApp::spawn().await;
    let connect = || async {
        let mut request = app.ws_url().into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        tokio_tungstenite::connect_async(request).await.unwrap().0
    };

    // A live client answers pings (tungstenite does as it reads) and stays connected.
    let mut live = connect().await;
    live.send(Message::Text(
        json!({ "type": "connection_init" }).to_string().into(),
    ))
    .await
    .unwrap();
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, live.next()).await {
        match message.expect("still open") {
            Message::Ping(_) => pings += 1,
            Message::Close(frame) => panic!("a live client was closed: {frame:?}"),
            _ => {}
        }
    }
    assert!(pings >= 2, "{pings} pings");

    // A client that never answers is dropped after two silent intervals.
    let mut dead = connect().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(message)) = dead.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the dead peer's socket is still open");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_websocket_message_closes_with_1009() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = TestApp::spawn().await;
    let mut request = app.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let huge = json!({ "type": "connection_init", "payload": { "pad": "x".repeat(300 * 1024) } });
    socket
        .send(Message::Text(huge.to_string().into()))
        .await
        .unwrap();
    let code = loop {
        match socket.next().await {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1009));
}
