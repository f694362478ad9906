use rechat::{App, Config};

use crate::harness::TestDatabase;

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_secret_key_is_shared_by_every_process() {
    let db = TestDatabase::new().await;
    let config = || {
        let mut config = Config::for_tests(&db.url(), "http://127.0.0.1:9/v1");
        config.secret_key = None;
        config
    };
    let first = App::build(config())
        .await
        .expect("creates and migrates the database");
    let second = App::build(config())
        .await
        .expect("a second process on the same database");
    let user = rechat::users::domain::UserId::new();
    let (token, _) = first.keys.issue(user, 0).unwrap();
    assert_eq!(
        second
            .keys
            .verify(&token)
            .map(|s| (s.user, s.token_version)),
        Some((user, 0)),
        "both use the stored key"
    );

    let mut other = config();
    other.secret_key = Some("another-secret-that-is-at-least-32-bytes".into());
    let configured = App::build(other).await.unwrap();
    assert_eq!(
        configured.keys.verify(&token),
        None,
        "SECRET_KEY, when set, wins"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_mysql_says_how_to_fix_it() {
    let config = Config::for_tests(
        "mysql://root:hunter2@127.0.0.1:9/rechat",
        "http://127.0.0.1:9/v1",
    );
    let error = match App::build(config).await {
        Ok(_) => panic!("MySQL on port 9 cannot answer"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("cannot reach MySQL"), "{error}");
    assert!(error.contains("DATABASE_URL"), "{error}");
    assert!(
        !error.contains("hunter2"),
        "the password is not printed: {error}"
    );
}
