//! Docker API version shim.
//!
//! testcontainers 0.27 talks to the daemon through bollard 0.20, which pins Docker API 1.52 and
//! does not negotiate. Debian's engines are older (bookworm's 20.10 speaks 1.41, trixie's 26.1
//! speaks 1.45) and refuse such requests with "client version 1.52 is too new". When the daemon
//! is older, the testbed starts this shim: a Unix socket that forwards to the daemon and rewrites
//! the version prefix of request paths to the daemon's own, and points `DOCKER_HOST` at it for
//! this process before testcontainers' client is created. Responses pass unchanged; the fields
//! bollard reads are present in every API version since 1.41.
//!
//! Why a shim rather than a negotiating client (checked against the crates' sources): bollard
//! puts `/v1.52/` (`API_DEFAULT_VERSION`) in every request path and lowers it only when
//! `Docker::negotiate_version()` is called (the engine's own [`super::docker`] client does); it
//! reads no `DOCKER_API_VERSION`. testcontainers 0.27 builds its own client with that constant,
//! never negotiates, and takes neither a client nor a version setting (only `DOCKER_HOST`).
//! Negotiating on the clone `docker_client_instance()` returns would share its version, but
//! testcontainers holds its client only weakly and builds a fresh one at 1.52 whenever no
//! container is alive; 0.28 (bollard 0.21) pins 1.53. No Debian engine speaks 1.52: bookworm
//! ships 20.10 (1.41), trixie 26.1 (1.45), sid 28.5 (1.51). Since bollard's version only selects
//! the path prefix, rewriting the prefix does exactly what `negotiate_version()` would. A
//! `[patch]` of either crate would work too, at the price of carrying a fork.

use std::path::PathBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Replaces every occurrence of `from` by `to` (same length) in a byte stream, holding back
/// only a tail that could still be the start of `from`.
struct Rewriter {
    from: Vec<u8>,
    to: Vec<u8>,
    pending: Vec<u8>,
}

impl Rewriter {
    fn new(from: &str, to: &str) -> Self {
        assert_eq!(
            from.len(),
            to.len(),
            "version prefixes must have equal length"
        );
        Rewriter {
            from: from.as_bytes().to_vec(),
            to: to.as_bytes().to_vec(),
            pending: Vec::new(),
        }
    }

    /// Feeds bytes; returns the bytes that are ready to forward.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        let n = self.from.len();
        let mut i = 0;
        while i + n <= self.pending.len() {
            if self.pending[i..i + n] == self.from[..] {
                self.pending[i..i + n].copy_from_slice(&self.to);
                i += n;
            } else {
                i += 1;
            }
        }
        // Keep the longest suffix that is a proper prefix of `from`.
        let len = self.pending.len();
        let keep = (1..n.min(len + 1))
            .rev()
            .find(|&k| self.pending[len - k..] == self.from[..k])
            .unwrap_or(0);
        self.pending.drain(..len - keep).collect()
    }
}

async fn serve(client: UnixStream, daemon: PathBuf, from: String, to: String) {
    let Ok(upstream) = UnixStream::connect(&daemon).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async move {
        let mut rw = Rewriter::new(&from, &to);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = uw.write_all(&rw.pending).await;
                    let _ = uw.shutdown().await;
                    break;
                }
                Ok(n) => {
                    let out = rw.feed(&buf[..n]);
                    if uw.write_all(&out).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let down = async move {
        let _ = tokio::io::copy(&mut ur, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Prefix of the shim's socket directory in the temporary directory; the owner's pid follows.
const DIR_PREFIX: &str = "ms2m-docker-shim-";

/// Removes the socket directories of shims whose process has ended (a process cannot remove
/// its own on exit).
pub(crate) fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX));
        if pid.is_some_and(|p| !std::path::Path::new("/proc").join(p).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Starts the shim on a socket in a fresh temporary directory; returns its path. The listener
/// lives on a thread of its own so it outlives any one tokio runtime of the caller.
pub(crate) fn start(
    daemon: PathBuf,
    client_version: &str,
    daemon_version: &str,
) -> std::io::Result<PathBuf> {
    remove_stale();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("docker.sock");
    let _ = std::fs::remove_file(&path);
    let std_listener = std::os::unix::net::UnixListener::bind(&path)?;
    std_listener.set_nonblocking(true)?;
    let from = format!("/v{client_version}/");
    let to = format!("/v{daemon_version}/");
    if from.len() != to.len() {
        return Err(std::io::Error::other(format!(
            "cannot map API {client_version} onto {daemon_version}"
        )));
    }
    std::thread::Builder::new()
        .name("ms2m-docker-shim".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("shim runtime");
            rt.block_on(async move {
                let listener = UnixListener::from_std(std_listener).expect("shim listener");
                while let Ok((conn, _)) = listener.accept().await {
                    tokio::spawn(serve(conn, daemon.clone(), from.clone(), to.clone()));
                }
            });
        })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::Rewriter;

    #[test]
    fn rewrites_across_chunk_boundaries() {
        let mut r = Rewriter::new("/v1.52/", "/v1.41/");
        let mut out = r.feed(b"GET /v1.5");
        out.extend(r.feed(b"2/containers/json HTTP/1.1\r\n\r\nPOST /v1.52/x"));
        out.append(&mut r.pending);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /v1.41/containers/json HTTP/1.1\r\n\r\nPOST /v1.41/x"
        );
    }

    #[test]
    fn holds_back_nothing_that_cannot_match() {
        let mut r = Rewriter::new("/v1.52/", "/v1.41/");
        assert_eq!(r.feed(b"abc\r\n\r\n"), b"abc\r\n\r\n");
    }
}
