//! The phases a migration passes through, and their timestamps on the host clock.

use ms2m_wire::now_ns;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use strum::IntoStaticStr;

/// A phase of a migration. Each strategy runs a subset, in its own order; a failed migration
/// ends in `abort`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum PhaseName {
    /// The replay queue is bound (accumulation starts) and the target may start.
    Prepare,
    /// The source stops serving live.
    Stop,
    /// The source's state is captured (at a barrier, or after it stopped).
    Checkpoint,
    /// The checkpoint travels to the target host.
    Transfer,
    /// The target restores the checkpoint.
    Restore,
    /// The target replays the messages kept since the checkpoint, without side effects.
    Replay,
    /// The cutover: the target serves, the source and the replay queue go.
    Finalize,
    /// The rollback of a failed migration: the source serves again.
    Abort,
    /// The source died once its checkpoint was complete: the target takes over without it.
    TakeOver,
    /// The source died before its checkpoint was complete: a new, empty instance serves in
    /// its place.
    Restart,
}

impl PhaseName {
    /// The name used in reports and on the command line (the serde name).
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl std::fmt::Display for PhaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One phase of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Phase {
    pub name: PhaseName,
    pub start_ns: u64,
    pub end_ns: u64,
    pub duration_ms: f64,
}

/// Phase bookkeeping: `begin` closes the open phase and opens the next.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    phases: Vec<Phase>,
    open: Option<(PhaseName, u64)>,
}

impl Timeline {
    pub fn begin(&mut self, name: PhaseName) {
        self.begin_at(name, now_ns());
    }

    pub fn begin_at(&mut self, name: PhaseName, t_ns: u64) {
        self.end_at(t_ns);
        self.open = Some((name, t_ns));
    }

    pub fn end(&mut self) {
        self.end_at(now_ns());
    }

    pub fn end_at(&mut self, t_ns: u64) {
        if let Some((name, start)) = self.open.take() {
            let end = t_ns.max(start);
            self.phases.push(Phase {
                name,
                start_ns: start,
                end_ns: end,
                duration_ms: (end - start) as f64 / 1e6,
            });
        }
    }

    /// The phase in progress, if any.
    pub fn current(&self) -> Option<PhaseName> {
        self.open.map(|(n, _)| n)
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }
}

#[cfg(test)]
mod tests {
    use super::{PhaseName, Timeline};

    #[test]
    fn begin_closes_the_open_phase_and_end_closes_the_last() {
        let mut t = Timeline::default();
        t.begin_at(PhaseName::Prepare, 100);
        t.begin_at(PhaseName::Checkpoint, 250);
        assert_eq!(t.current(), Some(PhaseName::Checkpoint));
        t.end_at(400);
        assert_eq!(t.current(), None);
        let p = t.phases();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].name, p[0].start_ns, p[0].end_ns),
            (PhaseName::Prepare, 100, 250)
        );
        assert_eq!(
            (p[1].name, p[1].start_ns, p[1].end_ns),
            (PhaseName::Checkpoint, 250, 400)
        );
        assert_eq!(p[1].duration_ms, 150e-6);
    }

    #[test]
    fn end_without_open_phase_is_a_no_op_and_time_never_runs_backwards() {
        let mut t = Timeline::default();
        t.end_at(5);
        assert!(t.phases().is_empty());
        t.begin_at(PhaseName::Prepare, 10);
        t.end_at(3);
        assert_eq!(t.phases()[0].end_ns, 10);
        assert_eq!(t.phases()[0].duration_ms, 0.0);
    }

    #[test]
    fn phase_names_are_the_report_names() {
        for p in [
            PhaseName::Prepare,
            PhaseName::Stop,
            PhaseName::Checkpoint,
            PhaseName::Transfer,
            PhaseName::Restore,
            PhaseName::Replay,
            PhaseName::Finalize,
            PhaseName::Abort,
            PhaseName::TakeOver,
            PhaseName::Restart,
        ] {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.name()));
            assert_eq!(serde_json::from_str::<PhaseName>(&json).unwrap(), p);
        }
    }
}
