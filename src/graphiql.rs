//! GraphiQL, served whole by rechat so that it works without internet access: the page below,
//! and GraphiQL's browser bundle with React, which `build.rs` takes from the npm registry
//! (pinned versions, checked hashes) and embeds in the binary.

use axum::extract::Path;
use axum::response::{Html, IntoResponse, Response};
use http::{StatusCode, header};

/// Where the page finds the bundle: rechat itself, or a CDN when the build could not fetch it.
#[cfg(graphiql_bundled)]
const BASE: &str = "/graphiql/";
#[cfg(not(graphiql_bundled))]
const BASE: &str = "https://cdn.jsdelivr.net/npm/";

#[cfg(graphiql_bundled)]
macro_rules! asset {
    ($name:literal, $type:literal) => {
        (
            $name,
            $type,
            include_bytes!(concat!(env!("OUT_DIR"), "/graphiql/", $name)).as_slice(),
        )
    };
}

/// (file name, content type, bytes)
#[cfg(graphiql_bundled)]
const ASSETS: &[(&str, &str, &[u8])] = &[
    asset!("graphiql.min.js", "text/javascript; charset=utf-8"),
    asset!("graphiql.min.css", "text/css; charset=utf-8"),
    asset!("react.production.min.js", "text/javascript; charset=utf-8"),
    asset!(
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8"
    ),
];
#[cfg(not(graphiql_bundled))]
const ASSETS: &[(&str, &str, &[u8])] = &[];

/// The bundle's paths under `BASE`.
#[cfg(graphiql_bundled)]
const FILES: [&str; 4] = [
    "graphiql.min.css",
    "react.production.min.js",
    "react-dom.production.min.js",
    "graphiql.min.js",
];
#[cfg(not(graphiql_bundled))]
const FILES: [&str; 4] = [
    "graphiql@4.0.3/graphiql.min.css",
    "react@18.3.1/umd/react.production.min.js",
    "react-dom@18.3.1/umd/react-dom.production.min.js",
    "graphiql@4.0.3/graphiql.min.js",
];

static PAGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let [css, react, react_dom, graphiql] = FILES.map(|file| format!("{BASE}{file}"));
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rechat GraphiQL</title>
<style>body {{ margin: 0; height: 100vh; overflow: hidden; }} #graphiql {{ height: 100vh; }}</style>
<link rel="stylesheet" href="{css}">
<script src="{react}"></script>
<script src="{react_dom}"></script>
<script src="{graphiql}"></script>
</head>
<body>
<div id="graphiql">Loading GraphiQL…</div>
<script>
  // Queries go to /graphql over HTTP, subscriptions over a WebSocket on the same path. The
  // token typed in the Headers tab ({{"Authorization": "Bearer …"}}) is sent with both: each
  // new socket reads it when it connects.
  const http = new URL("/graphql", location.href);
  const ws = new URL("/graphql", location.href);
  ws.protocol = ws.protocol === "https:" ? "wss:" : "ws:";
  const wsConnectionParams = {{
    get Authorization() {{
      try {{
        const headers = JSON.parse(localStorage.getItem("graphiql:headers") || "{{}}");
        return headers.Authorization || headers.authorization;
      }} catch {{
        return undefined;
      }}
    }},
  }};
  const fetcher = GraphiQL.createFetcher({{ url: http.href, subscriptionUrl: ws.href, wsConnectionParams }});
  ReactDOM.createRoot(document.getElementById("graphiql")).render(
    React.createElement(GraphiQL, {{ fetcher, shouldPersistHeaders: true, defaultEditorToolsVisibility: "headers" }}),
  );
</script>
</body>
</html>
"#
    )
});

pub async fn page() -> Html<&'static str> {
    Html(PAGE.as_str())
}

/// One file of the bundle; cached by browsers for a day.
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(file, _, _)| *file == name) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=86400"),
            ],
            *bytes,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
