//! Links between each host and the broker's host, and between hosts for direct transfers:
//! bandwidth per direction, one-way delay, jitter and outages, emulated by a TCP relay per
//! shaped host that its instances reach the broker through, and one per direct transfer
//! (ARCHITECTURE.md, "Links").
//!
//! Why a relay and not the kernel: this kernel has no netem, so it cannot delay packets; a
//! relay in user space delays, paces and holds the same way on both runtimes, so one testbed
//! file gives the same link on either. Bandwidth is paced per TCP segment's payload (1,448
//! bytes), not per read, and the link probe measures what each link gives at testbed start.

pub mod probe;
pub mod relay;
pub mod shaper;

use crate::amqp_url::url_host_port;
use crate::error::{Error, Result};
use probe::{LinkProbe, ProbeServer};
use relay::{Hop, LinkState, Relay, Traffic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

/// One host's link to the broker's host. Every field left out is unshaped: no figure at all is
/// today's direct connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Bandwidth from the host towards the broker, Mbit/s of TCP payload.
    #[serde(default)]
    pub up_mbit: Option<f64>,
    /// Bandwidth from the broker towards the host, Mbit/s of TCP payload.
    #[serde(default)]
    pub down_mbit: Option<f64>,
    /// One-way delay, ms, in each direction.
    #[serde(default)]
    pub delay_ms: f64,
    /// Each piece of data is delayed by `delay_ms` plus a draw uniform in ±`jitter_ms` (never
    /// below no delay), keeping the stream's order.
    #[serde(default)]
    pub jitter_ms: f64,
}

impl LinkSpec {
    pub fn is_unshaped(&self) -> bool {
        self.up_mbit.is_none()
            && self.down_mbit.is_none()
            && self.delay_ms == 0.0
            && self.jitter_ms == 0.0
    }

    pub fn validate(&self, host: &str) -> Result<()> {
        for (what, v) in [("up_mbit", self.up_mbit), ("down_mbit", self.down_mbit)] {
            if let Some(v) = v {
                if !(v.is_finite() && v >= 0.01) {
                    return Err(Error::Config(format!(
                        "link of {host}: {what} must be at least 0.01 Mbit/s (leave it out for \
                         an unshaped direction), got {v}"
                    )));
                }
            }
        }
        for (what, v) in [("delay_ms", self.delay_ms), ("jitter_ms", self.jitter_ms)] {
            if !(v.is_finite() && (0.0..=60_000.0).contains(&v)) {
                return Err(Error::Config(format!(
                    "link of {host}: {what} must be between 0 and 60000 ms, got {v}"
                )));
            }
        }
        Ok(())
    }
}

/// How the testbed emulates links.
pub const MECHANISM: &str = "relay";

/// A link as the report gives it: configured, how it was emulated, and what the probe
/// measured at testbed start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LinkReport {
    pub configured: LinkSpec,
    /// `relay`: a TCP relay in the harness paces, delays and holds each direction.
    pub mechanism: String,
    pub measured: Option<LinkProbe>,
    /// Where the measured figures are not within 10% of the configured ones (round trips:
    /// within 10% or 0.5 ms); empty when they all are. Also a probe that failed.
    pub deviations: Vec<String>,
}

/// Bytes one host's link carried during a migration, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LinkTraffic {
    /// Towards the broker.
    pub up_bytes: u64,
    /// From the broker.
    pub down_bytes: u64,
    /// Over the migration's duration, Mbit/s (not a link's peak: the average of the window).
    pub up_mbit: f64,
    pub down_mbit: f64,
}

/// A link between two hosts, for direct transfers between them: `up` is from the first host
/// named towards the second. Without one, a direct transfer crosses the source host's link and
/// then the target host's (both through the broker's host, as on a star of edge links).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostLink {
    pub between: [String; 2],
    pub link: LinkSpec,
}

impl HostLink {
    /// The name links and traffic are reported under: `a<->b`.
    pub fn name(&self) -> String {
        pair_name(&self.between[0], &self.between[1])
    }
}

fn pair_name(a: &str, b: &str) -> String {
    format!("{a}<->{b}")
}

/// Whether `name` names the link between `a` and `b`, in either order.
pub fn names_pair(name: &str, [a, b]: &[String; 2]) -> bool {
    name == pair_name(a, b) || name == pair_name(b, a)
}

/// The links of a testbed: each host that has one reaches the broker through a running relay;
/// links between hosts wait for a direct transfer to cross them.
pub struct Links {
    /// Every link by name: a host's, or a host pair's (`a<->b`).
    states: BTreeMap<String, Arc<LinkState>>,
    /// Each linked host's relay to the broker.
    relays: BTreeMap<String, Relay>,
    /// The links between hosts, by their two hosts in order.
    pairs: BTreeMap<(String, String), Arc<LinkState>>,
    /// Where relays and probes listen.
    listen: Option<IpAddr>,
    seed: u64,
    reports: Mutex<BTreeMap<String, LinkReport>>,
}

impl Links {
    /// No host has a link.
    pub fn none() -> Links {
        Links {
            states: BTreeMap::new(),
            relays: BTreeMap::new(),
            pairs: BTreeMap::new(),
            listen: None,
            seed: 0,
            reports: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts a relay per host of `specs` (even one with no figure: its link can then have
    /// outages and change later), listening on `listen` (the address the host's instances
    /// reach this machine on), towards the broker at `broker_url` (as this machine reaches
    /// it); keeps the links between hosts; then probes each link.
    pub fn start(
        specs: &BTreeMap<String, LinkSpec>,
        host_links: &[HostLink],
        listen: IpAddr,
        broker_url: &str,
        seed: u64,
    ) -> Result<Links> {
        let upstream = resolve(broker_url)?;
        let mut links = Links {
            listen: Some(listen),
            seed,
            ..Links::none()
        };
        for (i, (host, spec)) in specs.iter().enumerate() {
            let relay = Relay::start(
                spec.clone(),
                SocketAddr::new(listen, 0),
                upstream,
                seed.wrapping_add(i as u64),
            )
            .map_err(|e| {
                Error::RuntimeUnavailable(format!(
                    "cannot start the link relay of {host} on {listen}: {e}"
                ))
            })?;
            let state = relay.link().expect("a relay of its own link").clone();
            links.states.insert(host.clone(), state);
            links.relays.insert(host.clone(), relay);
        }
        for hl in host_links {
            let state = LinkState::new(hl.link.clone());
            let [a, b] = hl.between.clone();
            links.pairs.insert((a, b), state.clone());
            links.states.insert(hl.name(), state);
        }
        // One after another: probes at the same time would share this machine's CPU and
        // disturb each other's figures.
        let all: Vec<_> = links
            .states
            .iter()
            .map(|(n, s)| (n.clone(), s.spec()))
            .collect();
        for (name, spec) in all {
            links.probe(&name, &spec)?;
        }
        Ok(links)
    }

    /// Probes the link `name` as `spec` configures it and keeps the result for reports.
    fn probe(&self, name: &str, spec: &LinkSpec) -> Result<()> {
        let listen = self.listen.expect("links with relays listen somewhere");
        let server = ProbeServer::start(listen).map_err(|e| {
            Error::RuntimeUnavailable(format!("cannot start the link probe on {listen}: {e}"))
        })?;
        let (measured, deviations) = match probe::probe(spec, listen, server.addr(), self.seed) {
            Ok(p) => {
                let d = p.deviations(spec);
                (Some(p), d)
            }
            Err(e) => (None, vec![format!("the probe failed: {e}")]),
        };
        let report = LinkReport {
            configured: spec.clone(),
            mechanism: MECHANISM.into(),
            measured,
            deviations,
        };
        self.reports
            .lock()
            .expect("links lock")
            .insert(name.to_string(), report);
        Ok(())
    }

    /// The name a link is kept under: `name`, or a pair's named the other way round.
    fn canonical(&self, name: &str) -> Option<String> {
        if self.states.contains_key(name) {
            return Some(name.to_string());
        }
        let (a, b) = name.split_once("<->")?;
        let reversed = pair_name(b, a);
        self.states.contains_key(&reversed).then_some(reversed)
    }

    fn link(&self, name: &str) -> Result<&Arc<LinkState>> {
        let found = self.canonical(name).and_then(|n| self.states.get(&n));
        found.ok_or_else(|| {
            Error::Config(format!(
                "{name:?} has no link (a host without one reaches the broker directly): give it \
                 one when the testbed starts (any Link, even one with no figure) to change it or \
                 cut it later"
            ))
        })
    }

    /// Refuses a host without a link (before a fault that needs one).
    pub fn check_link(&self, host: &str) -> Result<()> {
        self.link(host).map(drop)
    }

    /// The URL an instance on `host` reaches the broker with: `url` through the host's
    /// relay, or `url` itself for a host without a link.
    pub fn url_for(&self, host: &str, url: &str) -> String {
        match self.relays.get(host) {
            Some(r) => with_authority(url, r.addr()),
            None => url.to_string(),
        }
    }

    /// A relay for a direct transfer from a client on `client_host` to `server` on
    /// `server_host`, across the link between the two hosts or, without one, across the
    /// client host's link and then the server host's (each shared with the host's other
    /// traffic). None when the path crosses no link: the client connects to `server` itself.
    pub fn path(
        &self,
        client_host: &str,
        server_host: &str,
        server: SocketAddr,
    ) -> Result<Option<Relay>> {
        let (c, s) = (client_host.to_string(), server_host.to_string());
        let hops = if let Some(l) = self.pairs.get(&(c.clone(), s.clone())) {
            vec![Hop {
                link: l.clone(),
                up: true,
            }]
        } else if let Some(l) = self.pairs.get(&(s, c)) {
            vec![Hop {
                link: l.clone(),
                up: false,
            }]
        } else {
            let client = self.relays.get(client_host).and_then(Relay::link);
            let server = self.relays.get(server_host).and_then(Relay::link);
            let client = client.map(|l| Hop {
                link: l.clone(),
                up: true,
            });
            let server = server.map(|l| Hop {
                link: l.clone(),
                up: false,
            });
            client.into_iter().chain(server).collect()
        };
        let Some(listen) = self.listen.filter(|_| !hops.is_empty()) else {
            return Ok(None);
        };
        let seed = self.seed ^ 0x5eed_d1ec;
        Relay::through(hops, SocketAddr::new(listen, 0), server, seed)
            .map(Some)
            .map_err(|e| {
                Error::RuntimeUnavailable(format!(
                    "cannot start a relay from {client_host} to {server_host} on {listen}: {e}"
                ))
            })
    }

    /// The slowest bandwidth configured now on the links of `hosts` (either direction) and
    /// between them, Mbit/s; None when none of them is rate-limited.
    pub fn slowest_mbit(&self, hosts: &[&str]) -> Option<f64> {
        let on_path = |name: &String| {
            hosts.contains(&name.as_str())
                || name
                    .split_once("<->")
                    .is_some_and(|(a, b)| hosts.contains(&a) && hosts.contains(&b))
        };
        self.states
            .iter()
            .filter(|(name, _)| on_path(name))
            .flat_map(|(_, l)| {
                let s = l.spec();
                [s.up_mbit, s.down_mbit]
            })
            .flatten()
            .reduce(f64::min)
    }

    /// The links as configured now, with what the last probe of each measured.
    pub fn reports(&self) -> BTreeMap<String, LinkReport> {
        self.reports.lock().expect("links lock").clone()
    }

    /// Bytes each link has carried so far.
    pub fn traffic(&self) -> BTreeMap<String, Traffic> {
        self.states
            .iter()
            .map(|(h, l)| (h.clone(), l.traffic()))
            .collect()
    }

    /// Starts or ends an outage of a link (a host's, or `a<->b`).
    pub fn set_outage(&self, name: &str, down: bool) -> Result<()> {
        self.link(name)?.set_outage(down);
        Ok(())
    }

    /// Gives a link new figures (open connections included), then probes it. Blocks for the
    /// probe (a second or so).
    pub fn set_spec(&self, name: &str, spec: LinkSpec) -> Result<()> {
        spec.validate(name)?;
        self.link(name)?.set_spec(spec.clone());
        let name = self.canonical(name).unwrap_or_else(|| name.to_string());
        self.probe(&name, &spec)
    }

    pub fn stop(&self) {
        for r in self.relays.values() {
            r.stop();
        }
    }
}

/// The traffic between two readings, over `seconds`.
pub fn traffic_between(
    before: &BTreeMap<String, Traffic>,
    after: &BTreeMap<String, Traffic>,
    seconds: f64,
) -> BTreeMap<String, LinkTraffic> {
    after
        .iter()
        .map(|(h, a)| {
            let b = before.get(h).copied().unwrap_or_default();
            let (up, down) = (a.up - b.up, a.down - b.down);
            let rate = |bytes: u64| {
                if seconds > 0.0 {
                    bytes as f64 * 8.0 / seconds / 1e6
                } else {
                    0.0
                }
            };
            let t = LinkTraffic {
                up_bytes: up,
                down_bytes: down,
                up_mbit: rate(up),
                down_mbit: rate(down),
            };
            (h.clone(), t)
        })
        .collect()
}

fn resolve(url: &str) -> Result<SocketAddr> {
    let (host, port) = url_host_port(url)
        .ok_or_else(|| Error::Config(format!("cannot read host and port of {url:?}")))?;
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            Error::RuntimeUnavailable(format!("cannot resolve the broker's address {host}"))
        })
}

/// `url` with its host and port replaced by `addr` (credentials and vhost kept).
fn with_authority(url: &str, addr: SocketAddr) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let auth_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!(
        "{}{userinfo}{addr}{}",
        &url[..scheme_end],
        &rest[auth_end..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_go_through_the_relay() {
        let a: SocketAddr = "172.18.0.1:40000".parse().unwrap();
        assert_eq!(
            with_authority("amqp://guest:guest@ms2m-x-broker:5672/%2f", a),
            "amqp://guest:guest@172.18.0.1:40000/%2f"
        );
        assert_eq!(
            with_authority("amqp://h:5672", a),
            "amqp://172.18.0.1:40000"
        );
    }

    #[test]
    fn links_are_validated() {
        let ok = LinkSpec {
            up_mbit: Some(20.0),
            delay_ms: 20.0,
            ..LinkSpec::default()
        };
        assert!(ok.validate("edge-1").is_ok());
        assert!(!ok.is_unshaped());
        assert!(LinkSpec::default().is_unshaped());
        let bad = LinkSpec {
            down_mbit: Some(0.0),
            ..LinkSpec::default()
        };
        let e = bad.validate("edge-1").unwrap_err().to_string();
        assert!(e.contains("down_mbit"), "{e}");
        let neg = LinkSpec {
            delay_ms: -1.0,
            ..LinkSpec::default()
        };
        assert!(neg.validate("edge-1").is_err());
    }

    /// The relay really paces, delays and holds: real sockets on loopback, generous bounds
    /// (correctness, not timing: a busy machine only makes things slower, and the bounds
    /// below only ask for what no unshaped path could give).
    #[test]
    fn probe_measures_a_shaped_link() {
        let spec = LinkSpec {
            up_mbit: Some(8.0),
            down_mbit: Some(16.0),
            delay_ms: 10.0,
            jitter_ms: 0.0,
        };
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let server = ProbeServer::start(ip).unwrap();
        let p = probe::probe(&spec, ip, server.addr(), 1).unwrap();
        assert!(p.rtt_ms_p50 >= 20.0, "{p:?}");
        assert!(p.up_mbit <= 8.0 * 1.05, "{p:?}");
        assert!(p.down_mbit <= 16.0 * 1.05, "{p:?}");
        assert!(p.down_mbit > p.up_mbit, "{p:?}");
    }

    #[test]
    fn an_outage_holds_data_until_it_ends() {
        use std::io::{Read, Write};
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let server = ProbeServer::start(ip).unwrap();
        let spec = LinkSpec {
            delay_ms: 1.0,
            ..LinkSpec::default()
        };
        let relay = Relay::start(spec, SocketAddr::new(ip, 0), server.addr(), 1).unwrap();
        let mut s = std::net::TcpStream::connect(relay.addr()).unwrap();
        s.write_all(b"P").unwrap();
        let link = relay.link().unwrap();
        link.set_outage(true);
        s.write_all(b"x").unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(s.read_exact(&mut b).is_err(), "nothing crosses an outage");
        link.set_outage(false);
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        assert_eq!(link.traffic().up, 2);
    }
}
