//! Transport limits in front of the gRPC server, before any HTTP/2 or TLS:
//!
//! - **Handshake timeout**: a new connection must send its opening bytes
//!   (the 24-byte HTTP/2 preface, or a TLS ClientHello) within it, else it
//!   is closed; with TLS the handshake itself has the same timeout (tonic's).
//! - **Connection caps**: open connections in total and per peer IP address.
//!   A connection beyond the per-peer cap is closed at once. At the total
//!   cap, the oldest connection that has waited for its opening bytes for
//!   a second or more is closed to make room (silent connections cannot lock
//!   clients — or health probes — out); otherwise the new one is closed.
//! - **Streams per connection**: HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`
//!   (set on the tonic builder); [`StreamsPerConnectionLayer`] logs when a
//!   connection reaches it.
//!
//! Each limit logs when it bites, summarised (see `telemetry::limit_log`).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

use crate::telemetry::limit_log::LimitLog;
use crate::telemetry::metrics;

/// The HTTP/2 client preface is 24 bytes; a TLS ClientHello is longer.
const OPENING_BYTES: usize = 24;

/// At the connection cap, a connection that has sent nothing for this long
/// (or half the handshake timeout, if shorter) is closed to make room.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

/// The transport limits (`billing serve` flags).
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// How long a new connection may take to send its opening bytes (and,
    /// with TLS, to finish the handshake).
    pub handshake_timeout: Duration,
    /// Open connections, all peers.
    pub max_connections: usize,
    /// Open connections of one peer IP address.
    pub max_connections_per_peer: usize,
    /// HTTP/2 streams (calls) open at once on one connection.
    pub max_concurrent_streams: u32,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_peer: 256,
            max_concurrent_streams: 200,
        }
    }
}

static HANDSHAKE_TIMEOUT_LOG: LimitLog = LimitLog::new(
    "handshake_timeout",
    "connection closed: no HTTP/2 preface or TLS hello within the handshake timeout",
);
static PER_PEER_LOG: LimitLog = LimitLog::new(
    "connections_per_peer",
    "connection refused: its peer address has the most open connections allowed",
);
static TOTAL_LOG: LimitLog = LimitLog::new(
    "connections_total",
    "connection refused: the server has the most open connections allowed",
);
static EVICTED_LOG: LimitLog = LimitLog::new(
    "connections_total_evicted",
    "connection closed to make room: it had sent nothing yet and the server was at its connection limit",
);
static STREAMS_PER_CONNECTION_LOG: LimitLog = LimitLog::new(
    "streams_per_connection",
    "a connection reached its HTTP/2 concurrent stream limit: its further calls wait at the client",
);

/// Counts of open connections, shared by the acceptor and every connection.
struct Census {
    limits: TransportLimits,
    state: Mutex<CensusState>,
}

#[derive(Default)]
struct CensusState {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
    /// Connections still waiting for their opening bytes, oldest first:
    /// id, when admitted, and the way to close it.
    waiting: VecDeque<(u64, Instant, oneshot::Sender<()>)>,
    next_id: u64,
}

impl Census {
    fn lock(&self) -> std::sync::MutexGuard<'_, CensusState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection of `peer` (maybe closing the oldest silent one),
    /// or says which limit refuses it.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, &'static LimitLog> {
        let mut state = self.lock();
        if state.per_peer.get(&peer).copied().unwrap_or(0) >= self.limits.max_connections_per_peer {
            return Err(&PER_PEER_LOG);
        }
        if state.total >= self.limits.max_connections {
            // Make room by closing the oldest connection that has sent
            // nothing for a while (a client that just connected has not
            // been read yet: it is not silent).
            let grace = EVICTABLE_AFTER.min(self.limits.handshake_timeout / 2);
            let silent = state
                .waiting
                .front()
                .is_some_and(|(_, admitted, _)| admitted.elapsed() >= grace);
            if !silent {
                return Err(&TOTAL_LOG);
            }
            if let Some((_, _, evict)) = state.waiting.pop_front() {
                let _ = evict.send(());
            }
            EVICTED_LOG.refused(&peer);
        }
        state.total += 1;
        *state.per_peer.entry(peer).or_default() += 1;
        let id = state.next_id;
        state.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        state.waiting.push_back((id, Instant::now(), evict));
        metrics::connections_open_add(1);
        Ok(Admitted {
            permit: Permit {
                census: self.clone(),
                peer,
            },
            id,
            evicted,
        })
    }

    /// The connection `id` sent its opening bytes (or is gone): not evictable any more.
    fn opened(&self, id: u64) {
        let mut state = self.lock();
        if let Some(index) = state
            .waiting
            .iter()
            .position(|(waiting, ..)| *waiting == id)
        {
            state.waiting.remove(index);
        }
    }
}

struct Admitted {
    permit: Permit,
    id: u64,
    evicted: oneshot::Receiver<()>,
}

/// One open connection, counted until dropped (with the connection).
struct Permit {
    census: Arc<Census>,
    peer: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.census.lock();
        state.total = state.total.saturating_sub(1);
        if let Some(count) = state.per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                state.per_peer.remove(&self.peer);
            }
        }
        metrics::connections_open_add(-1);
    }
}

/// Accepts connections on `listener` under `limits` and yields those that
/// sent their opening bytes in time, for `Server::serve_with_incoming*`
/// (tonic applies TLS, when configured, to what this yields). Accepting
/// stops when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: TransportLimits,
) -> ReceiverStream<io::Result<LimitedConnection>> {
    let (ready, receiver) = mpsc::channel(64);
    let census = Arc::new(Census {
        limits,
        state: Mutex::new(CensusState::default()),
    });
    tokio::spawn(accept(listener, census, ready));
    ReceiverStream::new(receiver)
}

static ACCEPT_ERROR_LOG: LimitLog = LimitLog::new(
    "accept_errors",
    "cannot accept a connection (out of file descriptors?); retrying",
);

async fn accept(
    listener: TcpListener,
    census: Arc<Census>,
    ready: mpsc::Sender<io::Result<LimitedConnection>>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = ready.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // E.g. EMFILE: pause instead of spinning on the same error.
                ACCEPT_ERROR_LOG.refused(&error);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match census.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(log) => {
                log.refused(&peer.ip());
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(open(stream, peer, admitted, census.clone(), ready.clone()));
    }
}

/// Waits (bounded) for the connection's opening bytes, then hands it over.
async fn open(
    mut stream: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    census: Arc<Census>,
    ready: mpsc::Sender<io::Result<LimitedConnection>>,
) {
    let Admitted {
        permit,
        id,
        evicted,
    } = admitted;
    let timeout = census.limits.handshake_timeout;
    let opening = tokio::select! {
        read = tokio::time::timeout(timeout, read_opening(&mut stream)) => read,
        _ = evicted => return,
        // The server stopped accepting.
        _ = ready.closed() => return,
    };
    census.opened(id);
    let prefix = match opening {
        Ok(Ok(prefix)) => prefix,
        // Closed or reset before it said anything: nothing to log.
        Ok(Err(_)) => return,
        Err(_) => {
            HANDSHAKE_TIMEOUT_LOG.refused(&peer.ip());
            return;
        }
    };
    let info = ConnectionInfo {
        tcp: TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(peer),
        },
        streams: Arc::new(StreamCount::default()),
    };
    let connection = LimitedConnection {
        stream,
        prefix,
        consumed: 0,
        info,
        _permit: permit,
    };
    let _ = ready.send(Ok(connection)).await;
}

async fn read_opening(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut prefix = vec![0; 1024];
    let mut filled = 0;
    while filled < OPENING_BYTES {
        let read = stream.read(&mut prefix[filled..]).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += read;
    }
    prefix.truncate(filled);
    Ok(prefix)
}

/// Streams open on one connection (see [`StreamsPerConnectionLayer`]).
#[derive(Debug, Default)]
pub struct StreamCount {
    open: AtomicU32,
    /// Times the connection reached its limit (for tests and logs).
    reached_limit: AtomicU64,
}

/// What a request knows of its connection (in the request extensions).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    pub streams: Arc<StreamCount>,
}

/// An accepted connection that sent its opening bytes: they are read
/// again first, then the socket. Counted against the caps until dropped.
pub struct LimitedConnection {
    stream: TcpStream,
    prefix: Vec<u8>,
    consumed: usize,
    info: ConnectionInfo,
    _permit: Permit,
}

impl Connected for LimitedConnection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.consumed < self.prefix.len() {
            let rest = &self.prefix[self.consumed..];
            let count = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..count]);
            self.consumed += count;
            if self.consumed == self.prefix.len() {
                self.prefix = Vec::new();
                self.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Counts each connection's open streams (a call lasts until its response
/// body ends) and logs when a connection reaches `max_concurrent_streams`.
#[derive(Clone)]
pub struct StreamsPerConnectionLayer {
    max: u32,
}

impl StreamsPerConnectionLayer {
    pub fn new(max_concurrent_streams: u32) -> Self {
        Self {
            max: max_concurrent_streams,
        }
    }
}

impl<S> Layer<S> for StreamsPerConnectionLayer {
    type Service = StreamsPerConnection<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamsPerConnection {
            inner,
            max: self.max,
        }
    }
}

#[derive(Clone)]
pub struct StreamsPerConnection<S> {
    inner: S,
    max: u32,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for StreamsPerConnection<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let guard = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| OpenStream::new(info, self.max));
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| {
                    tonic::body::Body::new(GuardedBody {
                        inner: body,
                        _guard: guard,
                    })
                }),
                None => response,
            })
        })
    }
}

/// One stream counted on its connection until its response body is dropped.
struct OpenStream {
    info: ConnectionInfo,
}

impl OpenStream {
    fn new(info: &ConnectionInfo, max: u32) -> OpenStream {
        let open = info.streams.open.fetch_add(1, Ordering::AcqRel) + 1;
        if open >= max {
            info.streams.reached_limit.fetch_add(1, Ordering::Relaxed);
            let peer = info
                .tcp
                .remote_addr
                .map_or_else(|| "unknown".to_owned(), |peer| peer.ip().to_string());
            STREAMS_PER_CONNECTION_LOG.refused(&peer);
        }
        OpenStream { info: info.clone() }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.info.streams.open.fetch_sub(1, Ordering::AcqRel);
    }
}

struct GuardedBody {
    inner: tonic::body::Body,
    _guard: OpenStream,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
