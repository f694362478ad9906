//! The `rechat` binary: `serve` (default), `migrate`, `schema`, `create-admin`.

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rechat::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc gives memory back to the system after a burst (thousands of streams, a wave of
/// argon2 hashes) where glibc's allocator keeps most of it. Its `no_thp` feature keeps
/// transparent huge pages off: a 2 MiB page stays resident while any 4 KiB of it is used, which
/// held the RSS of a 4,000-stream burst at 2.5 times idle long after it ended.
#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--features dhat-heap`: every allocation is recorded, and `dhat-heap.json` (the heap at its
/// peak, by allocation site) is written when the process ends cleanly (SIGTERM).
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

#[derive(Parser)]
#[command(name = "rechat", version, about = "GraphQL gateway for Dify apps")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if needed, migrate it and serve the API (the default).
    Serve,
    /// Create the database if needed and run the migrations, then exit.
    Migrate,
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Create an admin account, or make an existing account admin (and reset its password).
    CreateAdmin {
        /// The account's email; asked for when missing.
        #[arg(long)]
        email: Option<String>,
        /// The password; asked for (without echo) when missing. Prefer the prompt: flags end up
        /// in shell history.
        #[arg(long)]
        password: Option<String>,
    },
}

/// mysql_async keeps up to 128 of its packet buffers for reuse, each up to this size (its default
/// is 4 MiB): after a few answers of megabytes, the pool alone held hundreds of MiB for good.
/// Statements are rarely larger; a larger one allocates and frees its own buffer.
const MYSQL_BUFFER_SIZE_CAP: &str = "65536";

fn main() -> std::process::ExitCode {
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::new_heap();
    if std::env::var_os("MYSQL_ASYNC_BUFFER_SIZE_CAP").is_none() {
        // SAFETY: no other thread exists yet (the runtime starts below).
        unsafe { std::env::set_var("MYSQL_ASYNC_BUFFER_SIZE_CAP", MYSQL_BUFFER_SIZE_CAP) };
    }
    let cli = Cli::parse();
    if let Some(Command::Schema) = cli.command {
        print!("{}", rechat::graphql::sdl());
        return std::process::ExitCode::SUCCESS;
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("rechat: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(error) = init_tracing(config.log_format) {
        eprintln!("rechat: invalid RUST_LOG: {error}");
        return std::process::ExitCode::from(2);
    }
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config).await,
            Command::Migrate => {
                rechat::db::ensure_database(&config).await?;
                rechat::db::migrate(config.database_url.as_str()).await?;
                println!("database {} is up to date", config.database_name());
                Ok(())
            }
            Command::CreateAdmin { email, password } => create_admin(config, email, password).await,
            Command::Schema => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rechat: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => EnvFilter::try_new(value)?,
        _ => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let address = std::net::SocketAddr::new(config.host, config.port);
    let app = rechat::App::build(config).await?;
    // Its first sweep runs at once: answers a previous run left STREAMING become INTERRUPTED.
    rechat::chat::spawn_sweeper(app.clone());
    let listener = rechat::http::listen(address)
        .with_context(|| format!("listening on {address} (set HOST and PORT)"))?;
    tracing::info!("rechat listening on http://{address} — GraphiQL at http://{address}/graphql");
    rechat::http::serve(listener, app.clone(), shutdown_signal())
        .await
        .context("serving HTTP")?;
    drain(&app).await;
    if app.streams.is_empty() {
        // Nothing of ours is live: no sweeper needs to wait for the lease to expire.
        let released = app
            .writer_db
            .run(rechat::db::STATEMENT_TIMEOUT, async |conn| {
                rechat::gateways::release(conn, app.gateway).await
            })
            .await;
        if let Err(error) = released {
            tracing::warn!(
                error = format!("{error:#}"),
                "releasing the gateway's lease failed"
            );
        }
    }
    Ok(())
}

/// Gives running answers time to finish and be stored before the process exits.
async fn drain(app: &rechat::App) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !app.streams.is_empty() && tokio::time::Instant::now() < deadline {
        tracing::info!(
            streams = app.streams.len(),
            "waiting for running answers to be stored"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut signal) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            signal.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

fn prompt(label: &str) -> anyhow::Result<String> {
    print!("{label}: ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

async fn create_admin(
    config: Config,
    email: Option<String>,
    password: Option<String>,
) -> anyhow::Result<()> {
    let email = match email {
        Some(email) => email,
        None => prompt("Email")?,
    };
    let password = match password {
        Some(password) => password,
        None => rpassword::prompt_password("Password: ")?,
    };
    let app = rechat::App::build(config).await?;
    let outcome = rechat::users::admin_account(&app, &email, &password)
        .await
        .map_err(|e| anyhow::anyhow!(e.message()))?;
    println!("{outcome}");
    Ok(())
}
