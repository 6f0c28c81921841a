//! Links as TCP relays: a host's clients connect to the relay, which connects to the upstream
//! (the broker, or another host for a direct transfer) and forwards each direction through a
//! [`Shaper`] per link crossed ([`Hop`]): bandwidth, one-way delay and jitter, and an outage
//! that holds every byte until it ends. A link's state ([`LinkState`]) is shared by every
//! relay that crosses it.
//!
//! Blocking threads, not tokio tasks: tokio's timers have 1 ms granularity, which would add up
//! to a millisecond to every delay; a thread's sleep is precise to tens of microseconds. A
//! relay carries a few connections (an instance's AMQP connection each), two threads per
//! direction.

use super::shaper::Shaper;
use super::LinkSpec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long connecting to the upstream may take before the client is turned away.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer of the relay's sockets: small, so that what waits to cross the link waits in
/// the shaper's queue (bounded like a router's), not in a kernel buffer that autotuning grows
/// to megabytes.
const RECV_BUFFER: libc::c_int = 128 * 1024;
/// How often a held direction checks whether an outage has ended.
const OUTAGE_POLL: Duration = Duration::from_millis(1);

/// Bytes that crossed a link, per direction, since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// From the host towards the upstream.
    pub up: u64,
    /// From the upstream towards the host.
    pub down: u64,
}

/// One link's state, shared by every relay whose path crosses it: its figures, its outage,
/// its byte counters, and the one bottleneck queue per direction that all of them share.
pub struct LinkState {
    /// Read by every connection before each read: a change applies to what is sent next.
    spec: Mutex<LinkSpec>,
    outage: AtomicBool,
    up: AtomicU64,
    down: AtomicU64,
    /// When each direction (up, down) has serialized what was scheduled on it, as an offset
    /// from [`epoch`].
    link_free: [Mutex<Duration>; 2],
}

impl LinkState {
    pub fn new(spec: LinkSpec) -> Arc<LinkState> {
        Arc::new(LinkState {
            spec: Mutex::new(spec),
            outage: AtomicBool::new(false),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            link_free: [Mutex::new(Duration::ZERO), Mutex::new(Duration::ZERO)],
        })
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            up: self.up.load(Ordering::Relaxed),
            down: self.down.load(Ordering::Relaxed),
        }
    }

    /// The link's figures from now on, for open connections too.
    pub fn set_spec(&self, spec: LinkSpec) {
        *self.spec.lock().expect("link lock") = spec;
    }

    pub fn spec(&self) -> LinkSpec {
        self.spec.lock().expect("link lock").clone()
    }

    /// Starts (true) or ends (false) an outage: while it lasts nothing crosses the link in
    /// either direction, and what was sent waits (connections stay open).
    pub fn set_outage(&self, down: bool) {
        self.outage.store(down, Ordering::SeqCst);
    }

    pub fn in_outage(&self) -> bool {
        self.outage.load(Ordering::SeqCst)
    }
}

/// One link a relay's path crosses, and which way: `up` when the relay's clients send towards
/// the link's upstream end (a host's link: towards the broker).
#[derive(Clone)]
pub struct Hop {
    pub link: Arc<LinkState>,
    pub up: bool,
}

/// The instant every schedule counts from: one for the process, so that links shared by
/// several relays (a host's link, crossed by its broker relay and by a direct transfer's) keep
/// one timeline.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn elapsed() -> Duration {
    epoch().elapsed()
}

struct Shared {
    /// The links from the clients towards the upstream, in that order; the other direction
    /// crosses them backwards.
    hops: Vec<Hop>,
    upstream: SocketAddr,
    seed: u64,
    stopping: AtomicBool,
    /// Both sockets of every open connection, to cut them when the relay stops.
    conns: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next_conn: AtomicU64,
}

impl Shared {
    /// The hops of one direction (`up`: from the clients towards the upstream), in the order
    /// data crosses them, each with the direction it is crossed in.
    fn path(&self, up: bool) -> Vec<Hop> {
        if up {
            self.hops.clone()
        } else {
            self.hops
                .iter()
                .rev()
                .map(|h| Hop {
                    link: h.link.clone(),
                    up: !h.up,
                })
                .collect()
        }
    }

    fn in_outage(&self) -> bool {
        self.hops.iter().any(|h| h.link.in_outage())
    }
}

/// A running relay; [`Relay::stop`] (or dropping it) closes the listener and every connection.
pub struct Relay {
    addr: SocketAddr,
    /// The link of a relay started with [`Relay::start`].
    own: Option<Arc<LinkState>>,
    shared: Arc<Shared>,
}

impl Relay {
    /// Listens on `listen` (port 0: any free one) and relays every connection to `upstream`
    /// through a link of its own with `spec`; `seed` makes the jitter reproducible.
    pub fn start(
        spec: LinkSpec,
        listen: SocketAddr,
        upstream: SocketAddr,
        seed: u64,
    ) -> std::io::Result<Relay> {
        let link = LinkState::new(spec);
        let hop = Hop {
            link: link.clone(),
            up: true,
        };
        let mut relay = Relay::through(vec![hop], listen, upstream, seed)?;
        relay.own = Some(link);
        Ok(relay)
    }

    /// Listens on `listen` and relays every connection to `upstream` across `hops` (links that
    /// other relays may cross too: they share each one's bandwidth and outages).
    pub fn through(
        hops: Vec<Hop>,
        listen: SocketAddr,
        upstream: SocketAddr,
        seed: u64,
    ) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        epoch();
        let shared = Arc::new(Shared {
            hops,
            upstream,
            seed,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("ms2m-link".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(Relay {
            addr,
            own: None,
            shared,
        })
    }

    /// Where the host's clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The link of a relay started with [`Relay::start`].
    pub fn link(&self) -> Option<&Arc<LinkState>> {
        self.own.as_ref()
    }

    /// Closes the listener and cuts every connection.
    pub fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wakes the accept loop, which then sees `stopping`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for [a, b] in self.shared.conns.lock().expect("relay lock").values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tune(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let _ = s.set_nodelay(true);
    // SAFETY: setsockopt on a socket this process owns, with a c_int of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&RECV_BUFFER as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = client else {
            // Out of descriptors, say: wait rather than spin on the error.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        tune(&client);
        tune(&upstream);
        if let Err(e) = relay(&shared, client, upstream) {
            eprintln!("ms2m: link relay: {e}");
        }
    }
}

/// Starts both directions of one connection.
fn relay(shared: &Arc<Shared>, client: TcpStream, upstream: TcpStream) -> std::io::Result<()> {
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    shared
        .conns
        .lock()
        .expect("relay lock")
        .insert(id, [client.try_clone()?, upstream.try_clone()?]);
    let open = Arc::new(AtomicU64::new(2));
    for (up, from, to) in [
        (true, client.try_clone()?, upstream.try_clone()?),
        (false, upstream, client),
    ] {
        let path = shared.path(up);
        let shapers: Vec<Shaper> = path
            .iter()
            .map(|h| shaper_of(&h.link.spec.lock().expect("link lock"), h.up))
            .collect();
        // Bounded by the narrowest hop's queue.
        let capacity = shapers
            .iter()
            .map(|s| s.queue_bytes() / s.piece())
            .min()
            .unwrap_or(usize::MAX)
            .max(4);
        let (tx, rx) = sync_channel(capacity);
        let rng = StdRng::seed_from_u64(shared.seed ^ (id << 1 | u64::from(up)));
        let (s, w) = (shared.clone(), shared.clone());
        let writer_to = to.try_clone()?;
        let open = open.clone();
        std::thread::Builder::new()
            .name("ms2m-link-rd".into())
            .spawn(move || read_side(&s, path, from, shapers, rng, tx))?;
        std::thread::Builder::new()
            .name("ms2m-link-wr".into())
            .spawn(move || {
                write_side(&w, writer_to, rx);
                // The last direction to end forgets the connection.
                if open.fetch_sub(1, Ordering::SeqCst) == 1 {
                    w.conns.lock().expect("relay lock").remove(&id);
                }
            })?;
        drop(to);
    }
    Ok(())
}

/// One direction's shaper for `spec` (`up`: towards the upstream).
fn shaper_of(spec: &LinkSpec, up: bool) -> Shaper {
    let (mbit, delay, jitter) = figures(spec, up);
    Shaper::new(mbit, delay, jitter)
}

fn figures(spec: &LinkSpec, up: bool) -> (Option<f64>, Duration, Duration) {
    (
        if up { spec.up_mbit } else { spec.down_mbit },
        Duration::from_secs_f64(spec.delay_ms / 1e3),
        Duration::from_secs_f64(spec.jitter_ms / 1e3),
    )
}

fn hold_while_outage(shared: &Shared) {
    while shared.in_outage() && !shared.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(OUTAGE_POLL);
    }
}

/// Reads one direction, cuts it into pieces and schedules each across every hop of `path`;
/// ends at end of stream.
///
/// A piece reserves each hop's bottleneck from when it reaches that hop, so a later hop may be
/// reserved a little ahead of time: traffic that enters there meanwhile waits behind it, which
/// errs on the slow side by at most the earlier hops' delay.
fn read_side(
    shared: &Shared,
    path: Vec<Hop>,
    mut from: TcpStream,
    mut shapers: Vec<Shaper>,
    mut rng: StdRng,
    tx: SyncSender<(Duration, Vec<u8>)>,
) {
    let mut buf = vec![0u8; super::shaper::CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Data that arrives during an outage is scheduled once the link is back, at its rate.
        hold_while_outage(shared);
        for (hop, shaper) in path.iter().zip(shapers.iter_mut()) {
            let (mbit, delay, jitter) = figures(&hop.link.spec.lock().expect("link lock"), hop.up);
            shaper.reconfigure(mbit, delay, jitter);
        }
        let piece_len = shapers
            .iter()
            .map(Shaper::piece)
            .min()
            .unwrap_or(super::shaper::CHUNK);
        for piece in buf[..n].chunks(piece_len) {
            let mut at = elapsed();
            for (hop, shaper) in path.iter().zip(shapers.iter_mut()) {
                let mut free = hop.link.link_free[usize::from(!hop.up)]
                    .lock()
                    .expect("link lock");
                at = shaper.departure(&mut free, at, piece.len(), rng.random());
            }
            if tx.send((at, piece.to_vec())).is_err() {
                return;
            }
        }
        for hop in &path {
            let counter = if hop.up { &hop.link.up } else { &hop.link.down };
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Writes the pieces of one direction when they are due, those already due together; at the
/// end of the stream, ends the destination's too.
fn write_side(shared: &Shared, mut to: TcpStream, rx: Receiver<(Duration, Vec<u8>)>) {
    let mut next = None;
    let mut batch = Vec::new();
    while let Some((at, piece)) = next.take().or_else(|| rx.recv().ok()) {
        if let Some(wait) = at.checked_sub(elapsed()) {
            std::thread::sleep(wait);
        }
        hold_while_outage(shared);
        batch.clear();
        batch.extend_from_slice(&piece);
        let now = elapsed();
        while batch.len() < super::shaper::CHUNK {
            match rx.try_recv() {
                Ok((at, piece)) if at <= now => batch.extend_from_slice(&piece),
                Ok(later) => {
                    next = Some(later);
                    break;
                }
                Err(_) => break,
            }
        }
        if to.write_all(&batch).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
