//! The test harness: a real database, the production router on a real port, a fake Dify, and
//! actors that speak GraphQL over HTTP and WebSocket.

pub mod db;
pub mod fake_dify;
pub mod proxy;
pub mod ws;

use std::net::SocketAddr;

use rechat::{App, Config};
use serde_json::{Value, json};

pub use db::TestDatabase;
pub use fake_dify::{DIFY_KEY, FakeDify};
pub use ws::WsClient;

pub struct TestApp {
    pub app: App,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub dify: FakeDify,
    // Dropped last: the database outlives the app's connections.
    pub db: TestDatabase,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let db = TestDatabase::new().await;
        let dify = FakeDify::start("chat").await;
        Self::spawn_on(db, dify, adjust).await
    }

    /// The app on a database (and a fake Dify) the test prepared.
    pub async fn spawn_on(
        db: TestDatabase,
        dify: FakeDify,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::for_tests(&db.url(), &dify.url);
        adjust(&mut config);
        let app = App::build(config).await.expect("building the app");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(rechat::http::serve(
            listener,
            app.clone(),
            std::future::pending(),
        ));
        Self {
            app,
            addr,
            http: reqwest::Client::new(),
            dify,
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/graphql", self.addr)
    }

    /// GETs a path and returns the body as text.
    pub async fn get_text(&self, path: &str) -> String {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        response.text().await.expect("a text body")
    }

    /// POSTs a GraphQL request with an optional token and returns the JSON answer.
    pub async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut request = self
            .http
            .post(self.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("POST /graphql");
        response.json().await.expect("JSON answer")
    }

    pub fn anon(&self) -> Actor<'_> {
        Actor {
            app: self,
            token: None,
            id: String::new(),
        }
    }

    pub async fn register(&self, email: &str) -> Actor<'_> {
        let answer = self
            .gql(
                None,
                "mutation($input: RegisterInput!) { register(input: $input) { token user { id } } }",
                json!({ "input": { "email": email, "password": "correct horse battery" } }),
            )
            .await;
        let payload = &answer["data"]["register"];
        assert!(payload.is_object(), "register failed: {answer}");
        Actor {
            app: self,
            token: Some(payload["token"].as_str().unwrap().to_owned()),
            id: payload["user"]["id"].as_str().unwrap().to_owned(),
        }
    }

    /// The first account (admin) and a second, ordinary one.
    pub async fn admin_and_user(&self) -> (Actor<'_>, Actor<'_>) {
        (
            self.register("admin@example.com").await,
            self.register("user@example.com").await,
        )
    }

    /// Sets the fake Dify as the app's Dify in `mode`.
    pub async fn configure_dify(&self, admin: &Actor<'_>, mode: &str) {
        self.dify.set_mode(mode);
        let answer = admin
            .gql(
                "mutation($input: DifyConfigInput!) { setDifyConfig(input: $input) { isConfigured appMode } }",
                json!({ "input": { "apiKey": DIFY_KEY, "apiUrl": self.dify.url } }),
            )
            .await;
        assert_eq!(answer["data"]["setDifyConfig"]["appMode"], mode, "{answer}");
    }

    /// Runs a SQL query returning one string column (for assertions on stored rows).
    pub async fn sql_strings(&self, sql: &str) -> Vec<String> {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            value: String,
        }
        let mut conn = self.app.db.get().await.expect("connection");
        let rows: Vec<Row> = diesel::sql_query(sql).load(&mut conn).await.expect("query");
        rows.into_iter().map(|r| r.value).collect()
    }

    pub async fn sql(&self, sql: &str) {
        use diesel_async::RunQueryDsl;
        let mut conn = self.app.db.get().await.expect("connection");
        diesel::sql_query(sql)
            .execute(&mut conn)
            .await
            .expect("statement");
    }
}

pub struct Actor<'a> {
    pub app: &'a TestApp,
    pub token: Option<String>,
    pub id: String,
}

impl Actor<'_> {
    pub async fn gql(&self, query: &str, variables: Value) -> Value {
        self.app.gql(self.token.as_deref(), query, variables).await
    }

    pub async fn ws(&self, protocol: &str) -> WsClient {
        let payload = match &self.token {
            Some(token) => json!({ "Authorization": format!("Bearer {token}") }),
            None => json!({}),
        };
        WsClient::connect(&self.app.ws_url(), protocol, Some(payload))
            .await
            .expect("connection_ack")
    }
}

/// The `extensions.code` of the first error of an answer.
pub fn error_code(answer: &Value) -> &str {
    answer["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {answer}"))
}
