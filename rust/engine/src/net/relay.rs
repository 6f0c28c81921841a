//! One host's link as a TCP relay: the host's clients connect to the relay, which connects
//! to the upstream (the broker) and forwards each direction through a [`Shaper`]: bandwidth,
//! one-way delay and jitter, and an outage that holds every byte until it ends.
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
use std::sync::{Arc, Mutex};
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

struct Shared {
    /// Read by every connection before each read: a change applies to what is sent next.
    spec: Mutex<LinkSpec>,
    upstream: SocketAddr,
    epoch: Instant,
    seed: u64,
    outage: AtomicBool,
    stopping: AtomicBool,
    up: AtomicU64,
    down: AtomicU64,
    /// When each direction (up, down) has serialized what was scheduled on it: the one
    /// bottleneck queue every connection of the link shares.
    link_free: [Mutex<Duration>; 2],
    /// Both sockets of every open connection, to cut them when the relay stops.
    conns: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next_conn: AtomicU64,
}

/// A running relay; [`Relay::stop`] (or dropping it) closes the listener and every connection.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Relay {
    /// Listens on `listen` (port 0: any free one) and relays every connection to `upstream`
    /// through `spec`; `seed` makes the jitter reproducible.
    pub fn start(
        spec: LinkSpec,
        listen: SocketAddr,
        upstream: SocketAddr,
        seed: u64,
    ) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            spec: Mutex::new(spec),
            upstream,
            epoch: Instant::now(),
            seed,
            outage: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            link_free: [Mutex::new(Duration::ZERO), Mutex::new(Duration::ZERO)],
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("ms2m-link".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(Relay { addr, shared })
    }

    /// Where the host's clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            up: self.shared.up.load(Ordering::Relaxed),
            down: self.shared.down.load(Ordering::Relaxed),
        }
    }

    /// The link's figures from now on, for open connections too.
    pub fn set_spec(&self, spec: LinkSpec) {
        *self.shared.spec.lock().expect("relay lock") = spec;
    }

    pub fn spec(&self) -> LinkSpec {
        self.shared.spec.lock().expect("relay lock").clone()
    }

    /// Starts (true) or ends (false) an outage: while it lasts nothing crosses the link in
    /// either direction, and what was sent waits (connections stay open).
    pub fn set_outage(&self, down: bool) {
        self.shared.outage.store(down, Ordering::SeqCst);
    }

    pub fn in_outage(&self) -> bool {
        self.shared.outage.load(Ordering::SeqCst)
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
        let shaper = shaper_of(&shared.spec.lock().expect("relay lock"), up);
        let capacity = (shaper.queue_bytes() / shaper.piece()).max(4);
        let (tx, rx) = sync_channel(capacity);
        let rng = StdRng::seed_from_u64(shared.seed ^ (id << 1 | u64::from(up)));
        let (s, w) = (shared.clone(), shared.clone());
        let writer_to = to.try_clone()?;
        let open = open.clone();
        std::thread::Builder::new()
            .name("ms2m-link-rd".into())
            .spawn(move || read_side(&s, up, from, shaper, rng, tx))?;
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
    while shared.outage.load(Ordering::SeqCst) && !shared.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(OUTAGE_POLL);
    }
}

/// Reads one direction, cuts it into pieces and schedules each; ends at end of stream.
fn read_side(
    shared: &Shared,
    up: bool,
    mut from: TcpStream,
    mut shaper: Shaper,
    mut rng: StdRng,
    tx: SyncSender<(Duration, Vec<u8>)>,
) {
    let counter = if up { &shared.up } else { &shared.down };
    let mut buf = vec![0u8; super::shaper::CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Data that arrives during an outage is scheduled once the link is back, at its rate.
        hold_while_outage(shared);
        {
            let (mbit, delay, jitter) = figures(&shared.spec.lock().expect("relay lock"), up);
            shaper.reconfigure(mbit, delay, jitter);
        }
        let link_free = &shared.link_free[usize::from(!up)];
        for piece in buf[..n].chunks(shaper.piece()) {
            let at = {
                let mut free = link_free.lock().expect("relay lock");
                shaper.departure(&mut free, shared.epoch.elapsed(), piece.len(), rng.random())
            };
            if tx.send((at, piece.to_vec())).is_err() {
                return;
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Writes the pieces of one direction when they are due, those already due together; at the
/// end of the stream, ends the destination's too.
fn write_side(shared: &Shared, mut to: TcpStream, rx: Receiver<(Duration, Vec<u8>)>) {
    let mut next = None;
    let mut batch = Vec::new();
    while let Some((at, piece)) = next.take().or_else(|| rx.recv().ok()) {
        if let Some(wait) = at.checked_sub(shared.epoch.elapsed()) {
            std::thread::sleep(wait);
        }
        hold_while_outage(shared);
        batch.clear();
        batch.extend_from_slice(&piece);
        let now = shared.epoch.elapsed();
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
