use rechat::auth::token::Claims;
use serde_json::json;

use crate::harness::{TestApp, error_code};

const REGISTER: &str = "mutation($input: RegisterInput!) { register(input: $input) { token tokenType expiresAt user { id email fullName isAdmin isActive } } }";
const LOGIN: &str =
    "mutation($input: LoginInput!) { login(input: $input) { token user { email } } }";
const ME: &str = "{ me { id email isAdmin } }";

#[tokio::test(flavor = "multi_thread")]
async fn the_first_account_is_admin_and_emails_are_normalised() {
    let app = TestApp::spawn().await;
    let first = app
        .gql(None, REGISTER, json!({ "input": { "email": "  Ada@Example.COM ", "password": "12345678", "fullName": " Ada " } }))
        .await;
    let user = &first["data"]["register"]["user"];
    assert_eq!(user["email"], "ada@example.com");
    assert_eq!(user["fullName"], "Ada");
    assert_eq!(user["isAdmin"], true);
    assert_eq!(first["data"]["register"]["tokenType"], "bearer");
    let second = app
        .gql(
            None,
            REGISTER,
            json!({ "input": { "email": "bob@example.com", "password": "12345678" } }),
        )
        .await;
    assert_eq!(second["data"]["register"]["user"]["isAdmin"], false);

    let token = second["data"]["register"]["token"].as_str().unwrap();
    let me = app.gql(Some(token), ME, json!({})).await;
    assert_eq!(me["data"]["me"]["email"], "bob@example.com");
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_refuses_bad_input_and_taken_emails() {
    let app = TestApp::spawn().await;
    app.register("taken@example.com").await;
    for (email, password, code, field) in [
        ("not-an-email", "12345678", "BAD_USER_INPUT", Some("email")),
        ("a@b", "12345678", "BAD_USER_INPUT", Some("email")),
        (
            "short@example.com",
            "1234567",
            "BAD_USER_INPUT",
            Some("password"),
        ),
        (
            "long@example.com",
            &"x".repeat(129),
            "BAD_USER_INPUT",
            Some("password"),
        ),
        ("TAKEN@example.com", "12345678", "CONFLICT", None),
    ] {
        let answer = app
            .gql(
                None,
                REGISTER,
                json!({ "input": { "email": email, "password": password } }),
            )
            .await;
        assert_eq!(error_code(&answer), code, "{email}: {answer}");
        if let Some(field) = field {
            assert_eq!(answer["errors"][0]["extensions"]["field"], field);
        }
        assert!(answer["data"].is_null());
    }
    let count = app
        .sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM users")
        .await;
    assert_eq!(count, ["1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_gives_one_answer_for_unknown_email_and_wrong_password() {
    let app = TestApp::spawn().await;
    app.register("ada@example.com").await;
    let ok = app
        .gql(
            None,
            LOGIN,
            json!({ "input": { "email": "ADA@example.com", "password": "correct horse battery" } }),
        )
        .await;
    assert_eq!(ok["data"]["login"]["user"]["email"], "ada@example.com");

    let wrong = app
        .gql(
            None,
            LOGIN,
            json!({ "input": { "email": "ada@example.com", "password": "wrong password" } }),
        )
        .await;
    let unknown = app
        .gql(
            None,
            LOGIN,
            json!({ "input": { "email": "nobody@example.com", "password": "wrong password" } }),
        )
        .await;
    assert_eq!(error_code(&wrong), "UNAUTHENTICATED");
    assert_eq!(
        wrong["errors"][0]["message"],
        unknown["errors"][0]["message"]
    );
    assert_eq!(
        wrong["errors"][0]["extensions"],
        unknown["errors"][0]["extensions"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tampered_and_expired_tokens_are_unauthenticated() {
    let app = TestApp::spawn().await;
    let user = app.register("ada@example.com").await;
    let token = user.token.clone().unwrap();
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let now = chrono::Utc::now().timestamp();
    let expired = app
        .app
        .keys
        .sign(&Claims {
            sub: user.id.clone(),
            iat: now - 7200,
            exp: now - 3600,
            ver: 0,
        })
        .unwrap();
    let foreign = rechat::auth::token::Keys::new(
        b"some-other-secret-key-of-32-bytes!!",
        std::time::Duration::from_secs(60),
    )
    .sign(&Claims {
        sub: user.id.clone(),
        iat: now,
        exp: now + 600,
        ver: 0,
    })
    .unwrap();
    for bad in [
        None,
        Some("garbage"),
        Some(tampered.as_str()),
        Some(expired.as_str()),
        Some(foreign.as_str()),
    ] {
        let answer = app.gql(bad, ME, json!({})).await;
        assert_eq!(error_code(&answer), "UNAUTHENTICATED", "{bad:?}");
    }
    let with_scheme = app
        .http
        .post(app.url("/graphql"))
        .header("authorization", format!("Basic {token}"))
        .json(&json!({ "query": ME }))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(error_code(&with_scheme), "UNAUTHENTICATED");
}

#[tokio::test(flavor = "multi_thread")]
async fn deactivation_revokes_tokens_and_refuses_login() {
    let app = TestApp::spawn().await;
    let (admin, user) = app.admin_and_user().await;
    const SET_ACTIVE: &str = "mutation($id: ID!, $on: Boolean!) { setUserActive(userId: $id, isActive: $on) { isActive } }";
    let off = admin
        .gql(SET_ACTIVE, json!({ "id": user.id, "on": false }))
        .await;
    assert_eq!(off["data"]["setUserActive"]["isActive"], false);
    assert_eq!(
        error_code(&user.gql(ME, json!({})).await),
        "UNAUTHENTICATED"
    );
    let login = app.gql(None, LOGIN, json!({ "input": { "email": "user@example.com", "password": "correct horse battery" } })).await;
    assert_eq!(error_code(&login), "UNAUTHENTICATED");

    admin
        .gql(SET_ACTIVE, json!({ "id": user.id, "on": true }))
        .await;
    assert_eq!(
        error_code(&user.gql(ME, json!({})).await),
        "UNAUTHENTICATED",
        "old tokens stay revoked"
    );
    let login = app.gql(None, LOGIN, json!({ "input": { "email": "user@example.com", "password": "correct horse battery" } })).await;
    assert!(login["data"]["login"]["token"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_fields_are_guarded_and_the_last_admin_keeps_the_flag() {
    let app = TestApp::spawn().await;
    let (admin, user) = app.admin_and_user().await;
    const SET_ADMIN: &str =
        "mutation($id: ID!, $on: Boolean!) { setUserAdmin(userId: $id, isAdmin: $on) { isAdmin } }";
    for query in [
        "{ users { totalCount } }",
        "{ difyConfig { isConfigured } }",
    ] {
        assert_eq!(error_code(&user.gql(query, json!({})).await), "FORBIDDEN");
        assert_eq!(
            error_code(&app.anon().gql(query, json!({})).await),
            "UNAUTHENTICATED"
        );
    }
    assert_eq!(
        error_code(
            &user
                .gql(SET_ADMIN, json!({ "id": user.id, "on": true }))
                .await
        ),
        "FORBIDDEN"
    );

    let last = admin
        .gql(SET_ADMIN, json!({ "id": admin.id, "on": false }))
        .await;
    assert_eq!(error_code(&last), "BAD_USER_INPUT");
    let deactivate_last = admin
        .gql(
            "mutation($id: ID!) { setUserActive(userId: $id, isActive: false) { id } }",
            json!({ "id": admin.id }),
        )
        .await;
    assert_eq!(error_code(&deactivate_last), "BAD_USER_INPUT");

    let promoted = admin
        .gql(SET_ADMIN, json!({ "id": user.id, "on": true }))
        .await;
    assert_eq!(promoted["data"]["setUserAdmin"]["isAdmin"], true);
    let demoted = user
        .gql(SET_ADMIN, json!({ "id": admin.id, "on": false }))
        .await;
    assert_eq!(demoted["data"]["setUserAdmin"]["isAdmin"], false);
    assert_eq!(
        error_code(&admin.gql("{ users { totalCount } }", json!({})).await),
        "FORBIDDEN"
    );

    assert_eq!(
        error_code(
            &user
                .gql(SET_ADMIN, json!({ "id": "nope", "on": true }))
                .await
        ),
        "BAD_USER_INPUT"
    );
    let unknown = user
        .gql(
            SET_ADMIN,
            json!({ "id": uuid::Uuid::now_v7().to_string(), "on": true }),
        )
        .await;
    assert_eq!(error_code(&unknown), "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn users_page_forward_with_opaque_cursors() {
    let app = TestApp::spawn().await;
    let admin = app.register("a0@example.com").await;
    for i in 1..5 {
        app.register(&format!("a{i}@example.com")).await;
    }
    const USERS: &str = "query($after: String) { users(first: 2, after: $after) { totalCount nodes { email } pageInfo { hasNextPage hasPreviousPage endCursor } } }";
    let mut emails = Vec::new();
    let mut after = serde_json::Value::Null;
    loop {
        let page = admin.gql(USERS, json!({ "after": after })).await;
        let users = &page["data"]["users"];
        assert_eq!(users["totalCount"], 5);
        emails.extend(
            users["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["email"].as_str().unwrap().to_owned()),
        );
        if users["pageInfo"]["hasNextPage"] == false {
            break;
        }
        after = users["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(
        emails,
        (0..5)
            .map(|i| format!("a{i}@example.com"))
            .collect::<Vec<_>>()
    );
    for (first, cursor) in [(0, None), (101, None), (2, Some("not-a-cursor"))] {
        let answer = admin
            .gql(
                "query($f: Int!, $a: String) { users(first: $f, after: $a) { totalCount } }",
                json!({ "f": first, "a": cursor }),
            )
            .await;
        assert_eq!(error_code(&answer), "BAD_USER_INPUT", "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_admin_creates_or_promotes() {
    let app = TestApp::spawn().await;
    app.register("first@example.com").await;
    let user = app.register("later@example.com").await;
    let said = rechat::users::admin_account(&app.app, "LATER@example.com", "new password 1")
        .await
        .unwrap();
    assert!(said.contains("now an active admin"));
    assert_eq!(
        error_code(&user.gql(ME, json!({})).await),
        "UNAUTHENTICATED",
        "password reset revokes tokens"
    );
    let login = app
        .gql(
            None,
            LOGIN,
            json!({ "input": { "email": "later@example.com", "password": "new password 1" } }),
        )
        .await;
    let token = login["data"]["login"]["token"].as_str().unwrap();
    assert_eq!(
        app.gql(Some(token), ME, json!({})).await["data"]["me"]["isAdmin"],
        true
    );
    let said = rechat::users::admin_account(&app.app, "fresh@example.com", "another pass")
        .await
        .unwrap();
    assert!(said.contains("created"));
    assert!(
        rechat::users::admin_account(&app.app, "bad", "another pass")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_failed_logins_are_rate_limited() {
    let app = TestApp::spawn().await;
    app.register("ada@example.com").await;
    let attempt = |password: &'static str| {
        app.gql(
            None,
            LOGIN,
            json!({ "input": { "email": "ada@example.com", "password": password } }),
        )
    };
    for _ in 0..rechat::auth::throttle::ACCOUNT_MAX_FAILURES {
        assert_eq!(
            error_code(&attempt("wrong password").await),
            "UNAUTHENTICATED"
        );
    }
    let limited = attempt("correct horse battery").await;
    assert_eq!(error_code(&limited), "RATE_LIMITED");
    assert!(
        limited["errors"][0]["extensions"]["retryAfter"]
            .as_u64()
            .unwrap()
            > 0
    );
    let other = app
        .gql(
            None,
            LOGIN,
            json!({ "input": { "email": "bob@example.com", "password": "whatever1" } }),
        )
        .await;
    assert_eq!(
        error_code(&other),
        "UNAUTHENTICATED",
        "other emails are not affected"
    );
}

async fn login(app: &TestApp, email: &str, password: &str) -> serde_json::Value {
    app.gql(
        None,
        LOGIN,
        json!({ "input": { "email": email, "password": password } }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_guesses_cannot_pass_the_account_limit() {
    let app = TestApp::spawn_with(|c| c.auth_attempts_per_minute_per_address = 1000).await;
    app.register("dave@ex.com").await;
    let guesses = (0..30).map(|i| {
        let app = &app;
        async move { login(app, "dave@ex.com", &format!("guess number {i}")).await }
    });
    let answers = futures::future::join_all(guesses).await;
    let codes: Vec<&str> = answers.iter().map(error_code).collect();
    let verified = codes.iter().filter(|c| **c == "UNAUTHENTICATED").count();
    let limited = codes.iter().filter(|c| **c == "RATE_LIMITED").count();
    assert_eq!(
        (verified, limited),
        (rechat::auth::throttle::ACCOUNT_MAX_FAILURES as usize, 20),
        "{codes:?}"
    );
    // Every spelling of the address is the same account, and so the same lock.
    for spelling in [
        "ｄａｖｅ@ex.com",
        "DAVE@EX.COM",
        "dávé@ex.com",
        " Dave@Ex.Com ",
    ] {
        let answer = login(&app, spelling, "correct horse battery").await;
        assert_eq!(error_code(&answer), "RATE_LIMITED", "{spelling}: {answer}");
    }
    // An email without an account is locked the same way: the refusal tells nothing.
    for _ in 0..10 {
        login(&app, "nobody@ex.com", "guess guess").await;
    }
    let answer = login(&app, "nobody@ex.com", "guess guess").await;
    assert_eq!(error_code(&answer), "RATE_LIMITED");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_is_limited_across_accounts_and_registrations() {
    let app = TestApp::spawn_with(|c| c.auth_attempts_per_minute_per_address = 5).await;
    app.register("erin@ex.com").await;
    for i in 0..4 {
        let answer = login(&app, &format!("someone{i}@ex.com"), "a wrong password").await;
        assert_eq!(error_code(&answer), "UNAUTHENTICATED");
    }
    let answer = login(&app, "erin@ex.com", "correct horse battery").await;
    assert_eq!(error_code(&answer), "RATE_LIMITED", "{answer}");
    let answer = app
        .gql(
            None,
            REGISTER,
            json!({ "input": { "email": "frank@ex.com", "password": "12345678" } }),
        )
        .await;
    assert_eq!(error_code(&answer), "RATE_LIMITED");
    assert!(
        answer["errors"][0]["extensions"]["retryAfter"]
            .as_u64()
            .unwrap()
            <= 60
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_each_forwarded_address_counts_alone() {
    let app = TestApp::spawn_with(|c| {
        c.auth_attempts_per_minute_per_address = 2;
        c.trust_forwarded_for = true;
    })
    .await;
    let attempt = |forwarded: &'static str| {
        app.http
            .post(app.url("/graphql"))
            .header("x-forwarded-for", forwarded)
            .json(&json!({ "query": LOGIN, "variables": { "input": { "email": "x@ex.com", "password": "a wrong one" } } }))
            .send()
    };
    for _ in 0..2 {
        let answer: serde_json::Value = attempt("203.0.113.9, 198.51.100.1")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(error_code(&answer), "UNAUTHENTICATED");
    }
    let answer: serde_json::Value = attempt("203.0.113.9, 198.51.100.1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(error_code(&answer), "RATE_LIMITED");
    // The proxy appends the client's address: the entries before it are the client's to forge.
    let answer: serde_json::Value = attempt("198.51.100.1, 198.51.100.2")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(error_code(&answer), "UNAUTHENTICATED");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_emails_are_refused_before_any_work() {
    let app = TestApp::spawn_with(|c| c.auth_attempts_per_minute_per_address = 1000).await;
    let huge = format!("{}@ex.com", "a".repeat(200_000));
    for _ in 0..20 {
        let answer = login(&app, &huge, "whatever1").await;
        assert_eq!(error_code(&answer), "BAD_USER_INPUT");
        assert_eq!(answer["errors"][0]["extensions"]["field"], "email");
    }
    let answer = app
        .gql(
            None,
            REGISTER,
            json!({ "input": { "email": huge, "password": "12345678" } }),
        )
        .await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT");
}
