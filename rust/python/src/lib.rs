//! `ms2m._native`: the engine exposed to Python.
//!
//! Values cross the boundary as JSON strings (configurations in, reports and infos out): the
//! Python package turns them into typed objects. Every long call goes through [`block_on`],
//! which releases the GIL, honours Ctrl-C and converts the engine's errors into the exception
//! classes declared here. Each blocking call has an `_async` twin that returns an awaitable on
//! one shared tokio runtime.

mod service;

use ms2m_engine as engine;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

create_exception!(
    ms2m,
    Ms2mError,
    PyException,
    "Base class of every ms2m error."
);
create_exception!(
    ms2m,
    ConfigurationError,
    Ms2mError,
    "A configuration or argument was refused before anything started."
);
create_exception!(
    ms2m,
    RuntimeUnavailable,
    Ms2mError,
    "The runtime (Docker daemon, images, broker) cannot be used on this machine."
);
create_exception!(
    ms2m,
    MigrationFailed,
    Ms2mError,
    "A migration could not complete; it was rolled back and the source kept serving."
);
create_exception!(
    ms2m,
    BrokerError,
    Ms2mError,
    "The broker refused or dropped an operation."
);
create_exception!(
    ms2m,
    OperationTimeout,
    Ms2mError,
    "An instance or the broker did not answer in time."
);
create_exception!(
    ms2m,
    DockerError,
    Ms2mError,
    "A container operation failed (start, kill, remove, exec)."
);
create_exception!(
    ms2m,
    InstanceError,
    Ms2mError,
    "A service instance failed: it answered a command with an error, or exited (or hung) before it was ready."
);
create_exception!(
    ms2m,
    HostError,
    Ms2mError,
    "An operation on this machine failed (a file, a process, a thread)."
);

/// Converts an engine error into the Python exception of its kind.
trait IntoPyErr {
    fn into_py_err(self) -> PyErr;
}

impl IntoPyErr for engine::Error {
    fn into_py_err(self) -> PyErr {
        use engine::Error as E;
        let msg = self.to_string();
        match self {
            E::Config(_) => ConfigurationError::new_err(msg),
            E::RuntimeUnavailable(_) => RuntimeUnavailable::new_err(msg),
            E::MigrationFailed { .. } => MigrationFailed::new_err(msg),
            E::Broker { .. } | E::BrokerRefused(_) => BrokerError::new_err(msg),
            E::Docker { .. } => DockerError::new_err(msg),
            E::Instance { .. } | E::NotReady(_) => InstanceError::new_err(msg),
            E::Timeout(_) => OperationTimeout::new_err(msg),
            E::Io { .. } => HostError::new_err(msg),
            // `Error` is non-exhaustive: a kind added later is still an ms2m error.
            _ => Ms2mError::new_err(msg),
        }
    }
}

impl IntoPyErr for engine::testbed::MigrationError {
    fn into_py_err(self) -> PyErr {
        let failed = self.error.is_migration_failed();
        let err = self.error.into_py_err();
        if failed {
            // The checked report of the aborted run travels with the exception.
            let report_json = self.report.map(|r| r.to_json());
            Python::attach(|py| {
                let _ = err.value(py).setattr("report_json", report_json);
            });
        }
        err
    }
}

fn to_py(e: engine::Error) -> PyErr {
    e.into_py_err()
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> PyResult<T> {
    serde_json::from_str(json).map_err(|e| ConfigurationError::new_err(format!("{what}: {e}")))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("values serialize")
}

fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

/// Runs a future to completion without the GIL, checking for Ctrl-C every 100 ms. On an
/// interrupt the future is cancelled and KeyboardInterrupt propagates.
fn block_on<T, E, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: IntoPyErr + Send + 'static,
{
    let mut handle = runtime().spawn(fut);
    loop {
        let done = py.detach(|| {
            runtime().block_on(async {
                tokio::time::timeout(Duration::from_millis(100), &mut handle)
                    .await
                    .ok()
            })
        });
        match done {
            Some(Ok(r)) => return r.map_err(IntoPyErr::into_py_err),
            Some(Err(e)) => return Err(Ms2mError::new_err(format!("engine task failed: {e}"))),
            None => {
                if let Err(e) = py.check_signals() {
                    handle.abort();
                    return Err(e);
                }
            }
        }
    }
}

fn awaitable<'py, T, E, F>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
    E: IntoPyErr + Send + 'static,
{
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        fut.await.map_err(IntoPyErr::into_py_err)
    })
}

/// A running testbed (broker plus hosts). Create it with `Testbed.start(config_json)`.
#[pyclass(module = "ms2m._native", name = "Testbed", frozen)]
struct PyTestbed {
    inner: Arc<engine::Testbed>,
}

#[pymethods]
impl PyTestbed {
    /// Starts a testbed from a JSON `TestbedConfig`; blocks until the broker is ready.
    #[staticmethod]
    fn start(py: Python<'_>, config_json: &str) -> PyResult<PyTestbed> {
        let cfg: engine::TestbedConfig = parse("testbed configuration", config_json)?;
        let inner = block_on(py, engine::Testbed::start(cfg))?;
        Ok(PyTestbed {
            inner: Arc::new(inner),
        })
    }

    #[staticmethod]
    fn start_async<'py>(py: Python<'py>, config_json: &str) -> PyResult<Bound<'py, PyAny>> {
        let cfg: engine::TestbedConfig = parse("testbed configuration", config_json)?;
        awaitable(py, async move {
            let inner = engine::Testbed::start(cfg).await?;
            Ok::<_, engine::Error>(PyTestbed {
                inner: Arc::new(inner),
            })
        })
    }

    #[getter]
    fn id(&self) -> String {
        self.inner.id().to_string()
    }

    #[getter]
    fn amqp_url(&self) -> String {
        self.inner.amqp_url().to_string()
    }

    #[getter]
    fn runtime(&self) -> String {
        self.inner.runtime().name().to_string()
    }

    #[getter]
    fn config_json(&self) -> String {
        json(self.inner.config())
    }

    /// The shaped hosts' links (configured, mechanism, measured) as JSON.
    #[getter]
    fn links_json(&self) -> String {
        json(&self.inner.links())
    }

    /// Gives `host`'s link new figures (a JSON `LinkSpec`) and probes it again.
    fn set_link(&self, py: Python<'_>, host: String, spec_json: &str) -> PyResult<()> {
        let spec: engine::net::LinkSpec = parse("link", spec_json)?;
        let tb = self.inner.clone();
        block_on(py, async move { tb.set_link(&host, spec).await })
    }

    /// Starts (`down`) or ends an outage of `host`'s link.
    fn set_link_outage(&self, host: &str, down: bool) -> PyResult<()> {
        self.inner.set_link_outage(host, down).map_err(to_py)
    }

    /// Deploys a service from a JSON `ServiceSpec`; returns its `ServiceInfo` as JSON.
    fn deploy(&self, py: Python<'_>, spec_json: &str) -> PyResult<String> {
        let spec: engine::ServiceSpec = parse("service", spec_json)?;
        let tb = self.inner.clone();
        block_on(py, async move { tb.deploy(spec).await.map(|i| json(&i)) })
    }

    /// Deploys a service from a JSON `ServiceSpec`, runs the wire contract's rules against it
    /// and removes it; returns each rule's outcome as JSON.
    fn conformance(&self, py: Python<'_>, spec_json: &str) -> PyResult<String> {
        let spec: engine::ServiceSpec = parse("service", spec_json)?;
        let tb = self.inner.clone();
        block_on(
            py,
            async move { tb.conformance(spec).await.map(|r| json(&r)) },
        )
    }

    fn service_info(&self, py: Python<'_>, service: String) -> PyResult<String> {
        let tb = self.inner.clone();
        block_on(py, async move {
            tb.service_info(&service).await.map(|i| json(&i))
        })
    }

    /// Removes a service with its workload, instance, recorder and broker resources.
    fn remove(&self, py: Python<'_>, service: String) -> PyResult<()> {
        let tb = self.inner.clone();
        block_on(py, async move { tb.remove(&service).await })
    }

    fn start_workload(&self, py: Python<'_>, service: String, spec_json: &str) -> PyResult<()> {
        let spec: engine::WorkloadSpec = parse("workload", spec_json)?;
        let tb = self.inner.clone();
        block_on(py, async move { tb.start_workload(&service, spec).await })
    }

    fn stop_workload(&self, py: Python<'_>, service: String) -> PyResult<()> {
        let tb = self.inner.clone();
        block_on(py, async move { tb.stop_workload(&service).await })
    }

    /// Migrates a service; returns the report as JSON.
    fn migrate(
        &self,
        py: Python<'_>,
        service: String,
        to: String,
        strategy: &str,
        options_json: &str,
    ) -> PyResult<String> {
        let strategy: engine::Strategy = strategy.parse().map_err(to_py)?;
        let opts: engine::MigrationOptions = parse("migration options", options_json)?;
        let tb = self.inner.clone();
        block_on(py, async move {
            tb.migrate(&service, &to, strategy, opts)
                .await
                .map(|r| r.to_json())
        })
    }

    fn migrate_async<'py>(
        &self,
        py: Python<'py>,
        service: String,
        to: String,
        strategy: &str,
        options_json: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let strategy: engine::Strategy = strategy.parse().map_err(to_py)?;
        let opts: engine::MigrationOptions = parse("migration options", options_json)?;
        let tb = self.inner.clone();
        awaitable(py, async move {
            tb.migrate(&service, &to, strategy, opts)
                .await
                .map(|r| r.to_json())
        })
    }

    /// Restarts the broker the testbed started, down for `down_s` seconds in between.
    fn restart_broker(&self, py: Python<'_>, down_s: f64) -> PyResult<()> {
        if !(down_s.is_finite() && down_s >= 0.0) {
            return Err(ConfigurationError::new_err("down_s must be a number >= 0"));
        }
        let tb = self.inner.clone();
        block_on(py, async move {
            tb.restart_broker(Duration::from_secs_f64(down_s)).await
        })
    }

    /// The broker's queues as JSON `[[name, ready_messages], ...]` (the testbed's own excluded).
    fn broker_queues(&self, py: Python<'_>) -> PyResult<String> {
        let tb = self.inner.clone();
        block_on(
            py,
            async move { tb.broker_queues().await.map(|q| json(&q)) },
        )
    }

    /// Waits until every message sent so far was processed live; returns whether it was.
    fn wait_processed(&self, py: Python<'_>, service: String, timeout_s: f64) -> PyResult<bool> {
        if !(timeout_s.is_finite() && timeout_s >= 0.0) {
            return Err(ConfigurationError::new_err(
                "timeout_s must be a number >= 0",
            ));
        }
        let tb = self.inner.clone();
        block_on(py, async move {
            tb.wait_processed(&service, Duration::from_secs_f64(timeout_s))
                .await
        })
    }

    /// The recorded history of a service (sent messages and output events) as JSON.
    fn history(&self, py: Python<'_>, service: String) -> PyResult<String> {
        let tb = self.inner.clone();
        block_on(
            py,
            async move { tb.history(&service).await.map(|h| json(&h)) },
        )
    }

    /// Leaves the containers running for debugging (see the engine's `Testbed::keep`).
    fn keep(&self) {
        self.inner.keep();
    }

    /// Stops workloads and removes every container of the testbed. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let tb = self.inner.clone();
        block_on(py, async move { tb.close().await })
    }

    fn close_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let tb = self.inner.clone();
        awaitable(py, async move { tb.close().await })
    }
}

impl Drop for PyTestbed {
    fn drop(&mut self) {
        // Backstop for a testbed that was never closed: remove its containers now. The
        // containers' own Drop needs a runtime context, which this Python thread lacks.
        let _guard = runtime().enter();
        if Arc::strong_count(&self.inner) == 1 {
            let tb = self.inner.clone();
            let _ = runtime().block_on(async move { tb.close().await });
        }
    }
}

/// Removes containers, networks and local processes left by crashed ms2m runs (all ms2m ones
/// with `all`); returns what was removed as JSON.
#[pyfunction]
#[pyo3(signature = (all = false))]
fn cleanup(py: Python<'_>, all: bool) -> PyResult<String> {
    block_on(py, async move {
        engine::runtime::cleanup_leftovers(all)
            .await
            .map(|c| json(&c))
    })
}

/// Checks a saved history offline: `history_json` as `Testbed.history` returns it, messages
/// sent after `cut_ns` are not expected, `observed_json` the final state (or None).
#[pyfunction]
#[pyo3(signature = (history_json, cut_ns = u64::MAX, observed_json = None))]
fn check_history(history_json: &str, cut_ns: u64, observed_json: Option<&str>) -> PyResult<String> {
    let history: engine::history::History = parse("history", history_json)?;
    let observed = observed_json
        .map(|o| parse("observed state", o))
        .transpose()?;
    Ok(json(&engine::checker::check(&history, cut_ns, observed)))
}

/// The per-message timeline of a history (as `Testbed.history` returns it) as CSV.
#[pyfunction]
fn timeline_csv(history_json: &str) -> PyResult<String> {
    let history: engine::history::History = parse("history", history_json)?;
    Ok(engine::export::timeline_csv(&history))
}

/// The latencies of a history before, during and after `[start_ns, end_ns)` as an
/// HdrHistogram interval log.
#[pyfunction]
fn interval_log(history_json: &str, start_ns: u64, end_ns: u64) -> PyResult<String> {
    let history: engine::history::History = parse("history", history_json)?;
    if end_ns < start_ns {
        return Err(ConfigurationError::new_err(
            "end_ns must not precede start_ns",
        ));
    }
    Ok(engine::export::interval_log(&history, (start_ns, end_ns)))
}

/// The JSON Schema of reports.
#[pyfunction]
fn report_schema() -> String {
    engine::report::schema_json()
}

/// Names of the strategies this build implements.
#[pyfunction]
fn strategies() -> Vec<&'static str> {
    engine::Strategy::ALL.iter().map(|s| s.name()).collect()
}

/// Each strategy's phases, in order.
#[pyfunction]
fn strategy_phases() -> std::collections::HashMap<&'static str, Vec<&'static str>> {
    engine::Strategy::ALL
        .iter()
        .map(|s| (s.name(), s.phases().iter().map(|p| p.name()).collect()))
        .collect()
}

/// The default testbed configuration as JSON.
#[pyfunction]
fn default_testbed_config() -> String {
    json(&engine::TestbedConfig::default())
}

/// The default migration options as JSON.
#[pyfunction]
fn default_migration_options() -> String {
    json(&engine::MigrationOptions::default())
}

/// The level of a confidence interval, checked: a probability strictly between 0 and 1.
fn level_in_range(level: f64) -> PyResult<f64> {
    match level > 0.0 && level < 1.0 {
        true => Ok(level),
        false => Err(ConfigurationError::new_err(format!(
            "a confidence level is a probability between 0 and 1 (0.95 for 95%), not {level}"
        ))),
    }
}

/// A median with its order-statistic confidence interval, as JSON (None: no value, or a NaN).
/// (The defaults spell out `engine::stats::LEVEL`, so that Python's signature shows them.)
#[pyfunction]
#[pyo3(signature = (values, level = 0.95))]
fn median_ci(values: Vec<f64>, level: f64) -> PyResult<Option<String>> {
    let level = level_in_range(level)?;
    Ok(engine::stats::median_ci(&values, level).map(|c| json(&c)))
}

/// A two-sided Mann-Whitney U test of `a` against `b`, as JSON (None: an empty sample or a NaN).
#[pyfunction]
fn mann_whitney(a: Vec<f64>, b: Vec<f64>) -> Option<String> {
    engine::stats::mann_whitney(&a, &b).map(|t| json(&t))
}

/// median(a) / median(b) with its bootstrap interval, as JSON (None: an empty sample, a NaN, or
/// a median of b of 0).
#[pyfunction]
#[pyo3(signature = (a, b, level = 0.95))]
fn ratio_of_medians(a: Vec<f64>, b: Vec<f64>, level: f64) -> PyResult<Option<String>> {
    let level = level_in_range(level)?;
    Ok(engine::stats::ratio_of_medians(&a, &b, level).map(|r| json(&r)))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("REPORT_SCHEMA", engine::report::SCHEMA)?;
    m.add_class::<PyTestbed>()?;
    m.add_function(wrap_pyfunction!(cleanup, m)?)?;
    m.add_function(wrap_pyfunction!(check_history, m)?)?;
    m.add_function(wrap_pyfunction!(strategies, m)?)?;
    m.add_function(wrap_pyfunction!(strategy_phases, m)?)?;
    m.add_function(wrap_pyfunction!(timeline_csv, m)?)?;
    m.add_function(wrap_pyfunction!(interval_log, m)?)?;
    m.add_function(wrap_pyfunction!(report_schema, m)?)?;
    m.add_function(wrap_pyfunction!(default_testbed_config, m)?)?;
    m.add_function(wrap_pyfunction!(default_migration_options, m)?)?;
    m.add_function(wrap_pyfunction!(median_ci, m)?)?;
    m.add_function(wrap_pyfunction!(mann_whitney, m)?)?;
    m.add_function(wrap_pyfunction!(ratio_of_medians, m)?)?;
    m.add_function(wrap_pyfunction!(service::serve_service, m)?)?;
    m.add("Ms2mError", py.get_type::<Ms2mError>())?;
    m.add("ConfigurationError", py.get_type::<ConfigurationError>())?;
    m.add("RuntimeUnavailable", py.get_type::<RuntimeUnavailable>())?;
    m.add("MigrationFailed", py.get_type::<MigrationFailed>())?;
    m.add("BrokerError", py.get_type::<BrokerError>())?;
    m.add("OperationTimeout", py.get_type::<OperationTimeout>())?;
    m.add("DockerError", py.get_type::<DockerError>())?;
    m.add("InstanceError", py.get_type::<InstanceError>())?;
    m.add("HostError", py.get_type::<HostError>())?;
    Ok(())
}
