//! The accept loop: hyper's HTTP/1 and HTTP/2 with the timeouts axum's `serve` does not set,
//! a cap on open connections, and each connection's peer address for the router.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};

use crate::app::App;

/// Pending connections the kernel keeps for the accept loop (capped by `net.core.somaxconn`):
/// thousands of clients reconnecting at once after a deploy or a network blip must wait in the
/// backlog, not have their SYNs dropped and retried a second later. tokio's `bind` asks for 1,024.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `address` with a backlog of [`LISTEN_BACKLOG`].
pub fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A client connection's share of `MAX_CONNECTIONS`, held by its requests (and by a WebSocket
/// upgraded from it) until the last of them ends.
#[derive(Clone)]
pub(super) struct ConnectionPermit(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// Serves the router until `shutdown` completes, at most `MAX_CONNECTIONS` client connections
/// at a time (more wait in the listen backlog). A connection that does not send a request's
/// headers in time (slowly dribbled headers, or an idle keep-alive) is closed, and a request
/// whose body stalls is answered 408 (`Config::header_read_timeout`, `body_timeout`). Sockets
/// get TCP_NODELAY: an answer streams as many small WebSocket frames, and Nagle's algorithm
/// would hold each back until the previous one is acknowledged (about 40 ms with delayed ACKs).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    let router = super::router(app.clone());
    let connections = Arc::new(tokio::sync::Semaphore::new(app.config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(app.config.ws_keepalive);
    tokio::pin!(shutdown);
    let mut full_logged = false;
    loop {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !std::mem::replace(&mut full_logged, true) {
                    tracing::warn!(
                        max = app.config.max_connections,
                        "MAX_CONNECTIONS reached; new connections wait"
                    );
                }
                tokio::select! {
                    permit = connections.clone().acquire_owned() => permit.expect("never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        full_logged = false;
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: let some connections end.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "setting TCP_NODELAY failed");
        }
        let (router, builder) = (router.clone(), builder.clone());
        let permit = ConnectionPermit(Arc::new(permit));
        let service =
            hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.extensions_mut().insert(permit.clone());
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // Requests in flight finish; WebSockets are upgraded and detached, and end with the process.
    graceful.shutdown().await;
    Ok(())
}
