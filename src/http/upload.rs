//! The GraphQL multipart request spec on `POST /graphql` (`uploadFile`): the body is streamed
//! (files spill to temporary files inside async-graphql, never whole in memory), only with an
//! `Authorization` header, and bounded by `UPLOAD_MAX_BYTES`.

use async_graphql::http::MultipartOptions;
use axum::extract::Request;
use axum::response::Response;
use futures::{StreamExt, TryStreamExt};
use http::{StatusCode, header};

use super::{BODY_LIMIT, HttpState, client_addr, error_response, execute};

pub(super) async fn graphql_multipart(state: &HttpState, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // No cookies are taken, so a form posted by another site carries no credentials; without
    // a token there is nothing to do but refuse (before reading the body).
    if !parts.headers.contains_key(header::AUTHORIZATION) {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "uploads need an Authorization: Bearer <token> header",
        );
    }
    let max_file = state.app.config.upload_max_bytes;
    // The file plus the request's other parts (operations, map).
    let max_body = max_file.saturating_add(BODY_LIMIT as u64);
    let mut read = 0u64;
    let body = body
        .into_data_stream()
        .map(move |chunk| {
            let chunk = chunk.map_err(std::io::Error::other)?;
            read += chunk.len() as u64;
            if read > max_body {
                return Err(std::io::Error::other(TooLarge));
            }
            Ok(chunk)
        })
        .into_async_read();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let options = MultipartOptions::default()
        .max_file_size(max_file as usize)
        .max_num_files(1);
    let graphql_request = match async_graphql::http::receive_body(content_type, body, options).await
    {
        Ok(request) => request,
        Err(error) => {
            let too_large = matches!(error, async_graphql::ParseRequestError::PayloadTooLarge)
                || error.to_string().contains("upload is larger");
            return if too_large {
                error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "LIMIT_EXCEEDED",
                    &format!("a file may have at most {max_file} bytes (UPLOAD_MAX_BYTES)"),
                )
            } else {
                error_response(
                    StatusCode::BAD_REQUEST,
                    "BAD_USER_INPUT",
                    &format!("not a GraphQL multipart request: {error}"),
                )
            };
        }
    };
    let client = client_addr(&state.app, &parts.headers, &parts.extensions);
    execute(state, &parts.headers, client, graphql_request).await
}

/// The body outgrew `UPLOAD_MAX_BYTES`.
#[derive(Debug)]
struct TooLarge;

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upload is larger than allowed")
    }
}

impl std::error::Error for TooLarge {}
