//! AMQP URLs: the parts the engine reads (host, loopback or not) and their redacted form for
//! reports. A leaf module: the configuration checks and the runtimes both use it.

/// The host part of an AMQP URL.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("amqp://")
        .or_else(|| url.strip_prefix("amqps://"))?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => host_port.split(':').next()?,
    };
    Some(host).filter(|h| !h.is_empty())
}

/// The host and port of an AMQP URL (5672, or 5671 for amqps, when it names none).
pub fn url_host_port(url: &str) -> Option<(&str, u16)> {
    let host = url_host(url)?;
    let rest = url.split("://").nth(1)?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    let after_host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, r)| r),
        None => host_port
            .split_once(':')
            .map_or("", |(_, p)| p)
            .trim_start_matches(':'),
    };
    let port = after_host.trim_start_matches(':');
    let default = if url.starts_with("amqps://") {
        5671
    } else {
        5672
    };
    let port = if port.is_empty() {
        default
    } else {
        port.parse().ok()?
    };
    Some((host, port))
}

pub fn is_loopback_url(url: &str) -> bool {
    url_host(url).is_some_and(|h| {
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

pub use ms2m_wire::redact_url as redact;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts() {
        assert_eq!(
            url_host("amqp://guest:guest@127.0.0.1:5672/%2f"),
            Some("127.0.0.1")
        );
        assert_eq!(
            url_host("amqps://rabbit.example/vh"),
            Some("rabbit.example")
        );
        assert_eq!(url_host("amqp://u:p@[::1]:5672"), Some("::1"));
        assert_eq!(url_host("amqp://"), None);
        assert_eq!(
            url_host_port("amqp://guest:guest@127.0.0.1:5673/%2f"),
            Some(("127.0.0.1", 5673))
        );
        assert_eq!(url_host_port("amqp://h/vh"), Some(("h", 5672)));
        assert_eq!(url_host_port("amqps://h"), Some(("h", 5671)));
        assert_eq!(url_host_port("amqp://u:p@[::1]:6000/"), Some(("::1", 6000)));
        assert!(is_loopback_url("amqp://localhost"));
        assert!(is_loopback_url("amqp://u:p@[::1]:1/"));
        assert!(!is_loopback_url("amqp://10.0.0.2:5672"));
        assert_eq!(
            redact("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact("amqp://h:5672"), "amqp://h:5672");
    }
}
