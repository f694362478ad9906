//! A TCP proxy in front of MariaDB that can freeze (pass no byte either way, as a stalled server
//! looks) or go down (drop every connection and refuse new ones, as a stopped server looks).
//! The shared MariaDB is never touched.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FreezableProxy {
    pub addr: SocketAddr,
    frozen: Arc<watch::Sender<bool>>,
    down: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    /// Listens on a free local port and forwards every connection to `upstream`.
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let frozen = Arc::new(watch::Sender::new(false));
        let down = Arc::new(watch::Sender::new(false));
        let task = tokio::spawn({
            let (frozen, down) = (frozen.clone(), down.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *down.borrow() {
                        continue; // dropped: the connection is refused
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    for (from, to) in [
                        (
                            Box::new(client_read) as Box<dyn AsyncRead + Send + Unpin>,
                            Box::new(server_write) as Box<dyn AsyncWrite + Send + Unpin>,
                        ),
                        (Box::new(server_read), Box::new(client_write)),
                    ] {
                        let (frozen, mut down) = (frozen.subscribe(), down.subscribe());
                        tokio::spawn(async move {
                            tokio::select! {
                                () = pipe(from, to, frozen) => {}
                                _ = down.wait_for(|d| *d) => {}
                            }
                        });
                    }
                }
            }
        });
        Self {
            addr,
            frozen,
            down,
            task,
        }
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Drops every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.down.send_replace(true);
    }

    pub fn restore(&self) {
        self.down.send_replace(false);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a freeze are held until the thaw too.
        if frozen.wait_for(|f| !f).await.is_err() || to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
