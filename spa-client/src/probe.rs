//! `spa knock --wait`: feedback without a reply from the gateway. SPA never answers, so the
//! client checks the result the way a user would: it connects to a TCP port of the granted
//! service from this machine until it answers or the time runs out, then says what the
//! outcome most likely means.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How the probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A TCP connection was accepted this long after the probe started.
    Answered(Duration),
    /// The port answered with a reset: open in the firewall, but nothing listens.
    Refused,
    /// Nothing answered: the firewall still drops this address.
    NoAnswer,
}

/// Connects to `to` until it answers or `limit` passes (at most 200 attempts). Each attempt
/// waits longer than the last (150 ms, 300 ms, … up to 1.2 s): a SYN that raced the grant is
/// retried quickly, and a slow path still gets time to answer.
pub fn wait_for(to: SocketAddr, limit: Duration) -> Outcome {
    let start = Instant::now();
    let deadline = start + limit;
    let mut last = Outcome::NoAnswer;
    let mut attempt_timeout = Duration::from_millis(150);
    for _ in 0..200 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = left.min(attempt_timeout);
        attempt_timeout = (attempt_timeout * 2).min(Duration::from_millis(1200));
        match TcpStream::connect_timeout(&to, timeout) {
            Ok(_) => return Outcome::Answered(start.elapsed()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = Outcome::Refused;
            }
            Err(_) => last = Outcome::NoAnswer,
        }
        std::thread::sleep(Duration::from_millis(50).min(left));
    }
    last
}

/// Packets `--wait` sends in all: a lost UDP datagram, or one that arrived while the gateway
/// was still reloading, is followed by a fresh one each second without an answer.
pub const MAX_PACKETS: u32 = 3;

/// Probes `to` until it answers or `limit` passes, calling `resend` (which sends a fresh
/// packet) after each second without an answer, [`MAX_PACKETS`]` - 1` times at most. Not after
/// a refusal: then the firewall already lets this address through.
pub fn wait_resending(
    to: SocketAddr,
    limit: Duration,
    mut resend: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let deadline = start + limit;
    let mut packets = 1;
    // Each round takes up to a second: bounded by the deadline and by this count.
    for _ in 0..limit.as_secs().saturating_add(2) {
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = wait_for(to, left.min(Duration::from_secs(1)));
        if let Outcome::Answered(_) = outcome {
            return Ok(Outcome::Answered(start.elapsed()));
        }
        if Instant::now() >= deadline {
            return Ok(outcome);
        }
        if outcome == Outcome::NoAnswer && packets < MAX_PACKETS {
            resend()?;
            packets += 1;
        }
    }
    Ok(wait_for(
        to,
        deadline.saturating_duration_since(Instant::now()),
    ))
}

/// The message for a failed probe: what happened and what to check.
pub fn explain(outcome: Outcome, to: SocketAddr, limit: Duration, spa_port: u16) -> String {
    match outcome {
        Outcome::Answered(after) => {
            format!("{to} answers ({} ms after the knock)", after.as_millis())
        }
        Outcome::Refused => format!(
            "{to} refused the connection: the firewall lets this address through, but nothing \
             listens on port {}; check the service on the gateway, or the probe port",
            to.port()
        ),
        Outcome::NoAnswer => format!(
            "no answer from {to} within {}s: the gateway did not open it for this address. \
             Most likely the gateway does not know this client's key (has the admin run \
             `spad client add`?), the service is not allowed for this client, the clocks differ \
             by more than a minute, or UDP port {spa_port} is blocked on the way; the gateway's \
             log says which",
            limit.as_secs_f32()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_listening_port_answers_and_a_closed_one_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        assert!(matches!(
            wait_for(open, Duration::from_secs(2)),
            Outcome::Answered(_)
        ));
        drop(listener);
        assert_eq!(wait_for(open, Duration::from_millis(300)), Outcome::Refused);
        // A refusal is not answered with more packets: the firewall already lets us through.
        let mut resent = 0;
        let outcome = wait_resending(open, Duration::from_millis(1500), || {
            resent += 1;
            Ok(())
        });
        assert_eq!((outcome.unwrap(), resent), (Outcome::Refused, 0));
        let text = explain(Outcome::NoAnswer, open, Duration::from_secs(5), 62201);
        assert!(
            text.contains("spad client add") && text.contains("62201"),
            "{text}"
        );
    }
}
