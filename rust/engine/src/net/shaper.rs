//! When each piece of a byte stream leaves one direction of an emulated link: the pure
//! schedule, without I/O or clocks (the relay feeds it the instants).
//!
//! A piece is serialized at the link's rate after the pieces before it, of every connection
//! that crosses the link (one bottleneck queue, first come first served: `link_free`, kept by
//! the relay per direction), then travels for the one-way delay plus a jitter drawn for it.
//! Pieces of one connection leave in the order they came, as on one TCP stream: a piece whose
//! jitter would make it overtake the one before leaves just after it.

use std::time::Duration;

/// A rate-limited direction is cut into pieces of one TCP segment's payload (Ethernet MTU), so
/// that bandwidth delays data as packets are, not as a relay's reads happen to come.
pub const SEGMENT: usize = 1448;
/// An unshaped direction forwards what one read returns, up to this.
pub const CHUNK: usize = 64 * 1024;

/// One direction of one connection across a link. Instants are offsets from the relay's
/// start, so the schedule needs no clock.
#[derive(Debug, Clone)]
pub struct Shaper {
    /// Bytes per second; None: unlimited.
    rate: Option<f64>,
    delay: Duration,
    jitter: Duration,
    last_departure: Duration,
}

impl Shaper {
    pub fn new(mbit: Option<f64>, delay: Duration, jitter: Duration) -> Self {
        Shaper {
            rate: mbit.map(|m| m * 1e6 / 8.0),
            delay,
            jitter,
            last_departure: Duration::ZERO,
        }
    }

    /// Takes a link's new figures for what comes next; what is scheduled stays scheduled.
    pub fn reconfigure(&mut self, mbit: Option<f64>, delay: Duration, jitter: Duration) {
        self.rate = mbit.map(|m| m * 1e6 / 8.0);
        self.delay = delay;
        self.jitter = jitter;
    }

    /// The most bytes to take as one piece.
    pub fn piece(&self) -> usize {
        if self.rate.is_some() {
            SEGMENT
        } else {
            CHUNK
        }
    }

    /// When a piece of `len` bytes that arrived at `now` leaves; `link_free` is when the
    /// link's direction has serialized everything before it (moved on past this piece);
    /// `unit` in [0, 1) picks the jitter (uniform in delay ± jitter, never below no delay).
    pub fn departure(
        &mut self,
        link_free: &mut Duration,
        now: Duration,
        len: usize,
        unit: f64,
    ) -> Duration {
        let sent = match self.rate {
            Some(r) => {
                let start = now.max(*link_free);
                *link_free = start + Duration::from_secs_f64(len as f64 / r);
                *link_free
            }
            None => now,
        };
        let jitter = self.jitter.as_secs_f64() * (2.0 * unit - 1.0);
        let delay = (self.delay.as_secs_f64() + jitter).max(0.0);
        let departure = (sent + Duration::from_secs_f64(delay)).max(self.last_departure);
        self.last_departure = departure;
        departure
    }

    /// How many bytes may wait in this direction before the relay stops reading: what the link
    /// holds in flight (its bandwidth-delay product) and 50 ms of queue, as a router would;
    /// an unlimited direction holds up to 8 MiB.
    pub fn queue_bytes(&self) -> usize {
        match self.rate {
            Some(r) => {
                let span = self.delay + self.jitter + Duration::from_millis(50);
                ((r * span.as_secs_f64()) as usize).max(64 * 1024)
            }
            None => 8 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    #[test]
    fn delay_only_adds_the_delay() {
        let mut s = Shaper::new(None, ms(20.0), Duration::ZERO);
        let mut free = Duration::ZERO;
        assert_eq!(s.departure(&mut free, ms(5.0), 100, 0.5), ms(25.0));
        assert_eq!(s.piece(), CHUNK);
    }

    #[test]
    fn bandwidth_serializes_back_to_back_pieces() {
        // 8 Mbit/s: 1,000 bytes take 1 ms.
        let mut s = Shaper::new(Some(8.0), ms(10.0), Duration::ZERO);
        let mut free = Duration::ZERO;
        let a = s.departure(&mut free, Duration::ZERO, 1000, 0.5);
        let b = s.departure(&mut free, Duration::ZERO, 1000, 0.5);
        assert!((a.as_secs_f64() - 0.011).abs() < 1e-9);
        assert!((b.as_secs_f64() - 0.012).abs() < 1e-9);
        // An idle link starts serializing when the piece arrives.
        let c = s.departure(&mut free, ms(100.0), 1000, 0.5);
        assert!((c.as_secs_f64() - 0.111).abs() < 1e-9);
        // Another connection's piece queues behind this one's on the same link.
        let mut other = Shaper::new(Some(8.0), ms(10.0), Duration::ZERO);
        let d = other.departure(&mut free, ms(100.0), 1000, 0.5);
        assert!((d.as_secs_f64() - 0.112).abs() < 1e-9);
    }

    #[test]
    fn jitter_never_reorders_nor_goes_below_zero() {
        let mut s = Shaper::new(None, ms(1.0), ms(5.0));
        let mut zero = Duration::ZERO;
        let free = &mut zero;
        let first = s.departure(free, Duration::ZERO, 10, 0.999);
        let second = s.departure(free, ms(0.1), 10, 0.0);
        assert!(second >= first);
        let mut t = Shaper::new(None, ms(1.0), ms(5.0));
        assert_eq!(t.departure(free, ms(3.0), 10, 0.0), ms(3.0));
    }

    #[test]
    fn queue_holds_the_bandwidth_delay_product() {
        // 80 Mbit/s = 10 MB/s, for 20 + 50 ms.
        let s = Shaper::new(Some(80.0), ms(20.0), Duration::ZERO);
        assert_eq!(s.queue_bytes(), 700_000);
        assert_eq!(
            Shaper::new(Some(0.1), ms(0.0), ms(0.0)).queue_bytes(),
            65536
        );
    }
}
