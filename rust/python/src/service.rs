//! The Python SDK's engine: a Python object run as an [`ms2m_service::Service`], so that the
//! wire contract is implemented once, in Rust, for services in either language.

use crate::{ConfigurationError, Ms2mError};
use ms2m_service::{Config, Message, Result, Service};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};

/// A Python object with `handle(payload: str) -> str | None`, `snapshot() -> bytes`,
/// `restore(data: bytes) -> None` and `digest() -> str` (`ms2m.service` adapts a user's class
/// to exactly these).
struct PyService(Py<PyAny>);

/// A Python exception as a service error; `loud` also prints its traceback to stderr, the
/// instance's log, where a user looks when a service crashed.
fn failed(py: Python<'_>, e: PyErr, loud: bool) -> ms2m_service::Error {
    if loud {
        e.print(py);
    }
    e.to_string().into()
}

impl Service for PyService {
    fn handle(&mut self, msg: &Message<'_>) -> Result<Option<String>> {
        Python::attach(|py| {
            let out = self
                .0
                .call_method1(py, "handle", (msg.payload,))
                .map_err(|e| failed(py, e, true))?;
            out.extract::<Option<String>>(py)
                .map_err(|e| failed(py, e, true))
        })
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        Python::attach(|py| {
            let snap = self
                .0
                .bind(py)
                .call_method0("snapshot")
                .map_err(|e| failed(py, e, true))?;
            if let Ok(b) = snap.cast::<PyBytes>() {
                return Ok(b.as_bytes().to_vec());
            }
            if let Ok(b) = snap.cast::<PyByteArray>() {
                return Ok(b.to_vec());
            }
            let kind = snap
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default();
            Err(format!("snapshot() must return bytes, not {kind}").into())
        })
    }

    fn restore(&mut self, data: Vec<u8>) -> Result<()> {
        Python::attach(|py| {
            let data = PyBytes::new(py, &data);
            self.0
                .call_method1(py, "restore", (data,))
                .map_err(|e| failed(py, e, true))?;
            Ok(())
        })
    }

    fn digest(&self) -> Result<String> {
        Python::attach(|py| {
            let d = self
                .0
                .call_method0(py, "digest")
                .map_err(|e| failed(py, e, true))?;
            d.extract::<String>(py).map_err(|e| failed(py, e, true))
        })
    }
}

/// Runs one instance of `service` (an adapted object, see [`PyService`]) until it is shut down;
/// `args` are the instance's flags, each falling back to its `MS2M_*` variable.
#[pyfunction]
pub fn serve_service(py: Python<'_>, service: Py<PyAny>, args: Vec<String>) -> PyResult<()> {
    let config =
        Config::from_args(args).map_err(|e| ConfigurationError::new_err(format!("{e:#}")))?;
    let service = PyService(service);
    py.detach(move || ms2m_service::run(config, service))
        .map_err(|e| Ms2mError::new_err(format!("{e:#}")))
}
