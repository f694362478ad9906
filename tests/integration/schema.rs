use serde_json::{Value, json};

use crate::harness::TestApp;

/// `schema.graphql` is generated from the code; `UPDATE_SCHEMA=1 cargo test` rewrites it.
#[test]
fn schema_graphql_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql");
    let sdl = rechat::graphql::sdl();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &sdl).unwrap();
    }
    let pinned = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        pinned == sdl,
        "schema.graphql is out of date: run `UPDATE_SCHEMA=1 cargo test --test integration schema`"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_and_field_is_documented() {
    let app = TestApp::spawn().await;
    let answer = app
        .gql(
            None,
            "{ __schema { types { name kind description fields { name description } inputFields { name description } enumValues { name description } } } }",
            json!({}),
        )
        .await;
    let mut missing = Vec::new();
    for ty in answer["data"]["__schema"]["types"].as_array().unwrap() {
        let name = ty["name"].as_str().unwrap();
        if name.starts_with("__") || ["Boolean", "String", "Int", "Float", "ID"].contains(&name) {
            continue;
        }
        if ty["description"].as_str().is_none_or(str::is_empty) {
            missing.push(name.to_owned());
        }
        for list in ["fields", "inputFields", "enumValues"] {
            for item in ty[list].as_array().unwrap_or(&Vec::new()) {
                if item["description"].as_str().is_none_or(str::is_empty) {
                    missing.push(format!("{name}.{}", item["name"].as_str().unwrap()));
                }
            }
        }
    }
    assert!(missing.is_empty(), "undocumented: {missing:?}");
    let _ = Value::Null;
}
