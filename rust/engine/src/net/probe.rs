//! The link probe: round trips and throughput measured through a link's relay to a probe
//! server in this process, so the report says what each link gave, not what was asked.
//!
//! A probe connection starts with one command byte: `P` echoes every byte back (pings), `U`
//! then a u64 N: the server reads N bytes and answers how long they took to arrive (first byte
//! to last) and how many came after the first read; `D` then a u64 N: the server sends N bytes.
//! The probe's relay is one of its own with the link's figures, on the address the host's
//! instances reach their relay on: the same code and the same path, to another upstream.

use super::relay::Relay;
use super::LinkSpec;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PINGS: usize = 30;
/// Throughput is timed over about this long at the configured rate.
const THROUGHPUT_SPAN_S: f64 = 0.5;
const MIN_BYTES: u64 = 256 * 1024;
const MAX_BYTES: u64 = 8 << 20;
/// A figure is within tolerance when it is within this fraction of the configured one...
pub const TOLERANCE: f64 = 0.10;
/// ... or, for round trips, within this many milliseconds (a link of no delay has a round
/// trip of some tens of microseconds, never 0).
const RTT_SLACK_MS: f64 = 0.5;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the probe measured on one link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LinkProbe {
    /// Round trips of one byte, ms (pings).
    pub rtt_ms_p50: f64,
    pub rtt_ms_p99: f64,
    /// Payload throughput towards the upstream and back, Mbit/s.
    pub up_mbit: f64,
    pub down_mbit: f64,
    /// Bytes timed in each direction.
    pub bytes: u64,
}

impl LinkProbe {
    /// Where the measured figures are not within [`TOLERANCE`] of the configured ones.
    pub fn deviations(&self, spec: &LinkSpec) -> Vec<String> {
        let mut out = Vec::new();
        let rtt = 2.0 * spec.delay_ms;
        if (self.rtt_ms_p50 - rtt).abs() > (TOLERANCE * rtt).max(RTT_SLACK_MS) {
            out.push(format!(
                "round trip p50 {:.2} ms, configured {rtt:.2} ms",
                self.rtt_ms_p50
            ));
        }
        for (what, measured, configured) in [
            ("up", self.up_mbit, spec.up_mbit),
            ("down", self.down_mbit, spec.down_mbit),
        ] {
            if let Some(c) = configured {
                if (measured - c).abs() > TOLERANCE * c {
                    out.push(format!(
                        "{what} {measured:.2} Mbit/s, configured {c:.2} Mbit/s"
                    ));
                }
            }
        }
        out
    }
}

/// A probe server: a listener on `ip` answering probe connections until dropped.
pub struct ProbeServer {
    addr: SocketAddr,
    quit: Arc<AtomicBool>,
}

impl ProbeServer {
    pub fn start(ip: IpAddr) -> std::io::Result<ProbeServer> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let quit = Arc::new(AtomicBool::new(false));
        let q = quit.clone();
        std::thread::Builder::new()
            .name("ms2m-probe".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if q.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let _ = std::thread::Builder::new()
                        .name("ms2m-probe-conn".into())
                        .spawn(move || serve(conn));
                }
            })?;
        Ok(ProbeServer { addr, quit })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `quit`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Answers one probe connection.
fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut cmd = [0u8; 1];
    s.read_exact(&mut cmd)?;
    match cmd[0] {
        b'P' => {
            let mut b = [0u8; 1];
            while s.read(&mut b)? == 1 {
                s.write_all(&b)?;
            }
        }
        b'U' => {
            let n = read_u64(&mut s)?;
            let (after_first, elapsed) = receive(&mut s, n)?;
            s.write_all(&after_first.to_le_bytes())?;
            s.write_all(&(elapsed.as_nanos() as u64).to_le_bytes())?;
        }
        b'D' => {
            let n = read_u64(&mut s)?;
            send(&mut s, n)?;
        }
        _ => {}
    }
    let _ = s.shutdown(Shutdown::Write);
    Ok(())
}

fn send(s: &mut TcpStream, n: u64) -> std::io::Result<()> {
    let buf = vec![0x5au8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// Reads `n` bytes; how many came after the first read, and from its end to the last byte.
fn receive(s: &mut TcpStream, n: u64) -> std::io::Result<(u64, Duration)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut first: Option<(Instant, u64)> = None;
    while got < n {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += k as u64;
        first.get_or_insert((Instant::now(), got));
    }
    let (t0, first_bytes) = first.unwrap_or((Instant::now(), 0));
    Ok((got - first_bytes, t0.elapsed()))
}

fn mbit(bytes: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return f64::INFINITY;
    }
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
}

/// Probes `spec` through a relay of its own on `ip` to `server`.
pub fn probe(
    spec: &LinkSpec,
    ip: IpAddr,
    server: SocketAddr,
    seed: u64,
) -> std::io::Result<LinkProbe> {
    let relay = Relay::start(spec.clone(), SocketAddr::new(ip, 0), server, seed)?;
    let connect = || -> std::io::Result<TcpStream> {
        let s = TcpStream::connect_timeout(&relay.addr(), IO_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    };
    let mut rtts = Vec::with_capacity(PINGS);
    {
        let mut s = connect()?;
        s.write_all(b"P")?;
        let mut b = [0u8; 1];
        for _ in 0..PINGS {
            let t = Instant::now();
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    rtts.sort_by(f64::total_cmp);
    let pick = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
    let slowest = [spec.up_mbit, spec.down_mbit]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
    let bytes = ((slowest * 1e6 / 8.0 * THROUGHPUT_SPAN_S) as u64).clamp(MIN_BYTES, MAX_BYTES);
    let up = {
        let mut s = connect()?;
        s.write_all(b"U")?;
        s.write_all(&bytes.to_le_bytes())?;
        send(&mut s, bytes)?;
        let after_first = read_u64(&mut s)?;
        let elapsed = Duration::from_nanos(read_u64(&mut s)?);
        mbit(after_first, elapsed)
    };
    let down = {
        let mut s = connect()?;
        s.write_all(b"D")?;
        s.write_all(&bytes.to_le_bytes())?;
        let (after_first, elapsed) = receive(&mut s, bytes)?;
        mbit(after_first, elapsed)
    };
    relay.stop();
    Ok(LinkProbe {
        rtt_ms_p50: pick(0.5),
        rtt_ms_p99: pick(0.99),
        up_mbit: up,
        down_mbit: down,
        bytes,
    })
}
