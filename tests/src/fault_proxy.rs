//! A TCP proxy on loopback between one operator replica and the API server, told by the test to
//! delay traffic, black-hole it, or reset connections. It works below TLS: it sees only bytes,
//! which is enough because the replica's election has connections of its own, so a test can
//! give the election and the controllers a proxy each.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to the traffic passing through it, from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward at once.
    None,
    /// Forward every piece of data this long after it arrived, in order, in both directions.
    Delay(Duration),
    /// Accept and read everything, forward nothing, ever: dropped, not buffered.
    BlackHole,
    /// Reset every open connection and every new one.
    Reset,
}

/// A running proxy; stops (dropping every connection) when dropped.
pub struct FaultProxy {
    /// The loopback port to connect to instead of the API server.
    pub port: u16,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free loopback port, forwarding without faults.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the fault proxy")?;
        let port = listener.local_addr()?.port();
        let (fault, watching) = watch::channel(Fault::None);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(proxy(client, upstream, watching.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { port, fault, task })
    }

    /// Applies `fault` to open connections and new ones.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn until_reset(fault: &mut watch::Receiver<Fault>) {
    if fault.wait_for(|f| *f == Fault::Reset).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resets a connection: with a zero linger time, closing it sends RST instead of FIN.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

async fn proxy(client: TcpStream, upstream: SocketAddr, mut fault: watch::Receiver<Fault>) {
    if *fault.borrow() == Fault::Reset {
        reset(&client);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let to_server = pump(client_read, server_write, fault.clone());
    let to_client = pump(server_read, client_write, fault.clone());
    tokio::select! {
        _ = async { tokio::join!(to_server, to_client) } => {}
        () = until_reset(&mut fault) => {}
    }
}

/// Copies `from` to `to`, applying the fault in force when each piece arrives. On a reset, the
/// write side is closed with RST.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, fault: watch::Receiver<Fault>) {
    let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut reset_watch = fault.clone();
    let read = async move {
        let mut buffer = vec![0u8; 32 * 1024];
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let current = *fault.borrow();
            let due = match current {
                Fault::None => Instant::now(),
                Fault::Delay(delay) => Instant::now() + delay,
                Fault::BlackHole => continue,
                Fault::Reset => break,
            };
            if queue.send((due, buffer[..read].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async {
        loop {
            tokio::select! {
                item = queued.recv() => {
                    let Some((due, data)) = item else { break };
                    tokio::time::sleep_until(due).await;
                    if to.write_all(&data).await.is_err() {
                        break;
                    }
                }
                () = until_reset(&mut reset_watch) => {
                    reset(to.as_ref());
                    return;
                }
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo() -> Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        Ok(address)
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8], within: Duration) -> Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut answer = vec![0u8; text.len()];
        tokio::time::timeout(within, stream.read_exact(&mut answer)).await??;
        Ok(answer)
    }

    #[tokio::test]
    async fn forwards_delays_black_holes_and_resets() -> Result<()> {
        let proxy = FaultProxy::start(echo().await?).await?;
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).await?;
        assert_eq!(round_trip(&mut stream, b"plain", Duration::from_secs(5)).await?, b"plain");

        proxy.set(Fault::Delay(Duration::from_millis(300)));
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"slow", Duration::from_secs(5)).await?, b"slow");
        assert!(started.elapsed() >= Duration::from_millis(600), "delayed both ways: {:?}", started.elapsed());

        proxy.set(Fault::BlackHole);
        assert!(round_trip(&mut stream, b"lost", Duration::from_millis(500)).await.is_err(), "black-holed");
        proxy.set(Fault::None);
        // What was black-holed is gone for good: the echo never sends "lost" later.
        assert_eq!(round_trip(&mut stream, b"back", Duration::from_secs(5)).await?, b"back");

        proxy.set(Fault::Reset);
        let mut buffer = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await?;
        assert!(matches!(closed, Err(_) | Ok(0)), "the open connection was reset: {closed:?}");
        let mut fresh = TcpStream::connect(("127.0.0.1", proxy.port)).await?;
        assert!(round_trip(&mut fresh, b"refused", Duration::from_secs(2)).await.is_err());
        Ok(())
    }
}
