//! The testbed's journal: one file per testbed, kept up to date as it declares queues and
//! migrates, from which `cleanup` repairs what a driver that died left half done.
//!
//! A dead driver's testbed is normally removed whole by its reaper, broker and all. Two things
//! outlive it: a broker it did not start (`amqp_url`), which keeps the testbed's queues and
//! exchanges, and a kept testbed (`keep()`, `TESTCONTAINERS_COMMAND=keep`), whose instances
//! go on running, maybe two of one service, mid-migration. [`recover`] deletes the first's
//! queues and exchanges, and gives the second one serving instance per service: a migration
//! that had not committed is rolled back (the target and the migration's queues go, the source
//! is told to serve), one that had is finished (the source goes).
//!
//! The file holds the broker's URL with its password, so it is readable by its owner only.

use crate::broker::Link;
use crate::config::RuntimeKind;
use crate::runtime::local::pid_alive;
use ms2m_wire::control::Command;
use ms2m_wire::names;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a testbed would leave behind, as of now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub testbed: String,
    /// The driver's pid: the entry is a dead driver's once it is gone.
    pub owner: u32,
    pub runtime: Option<RuntimeKind>,
    /// The broker's URL from the driver's machine (with its password).
    pub amqp_url: String,
    /// The broker is not the testbed's own: its queues and exchanges outlive the testbed.
    pub external: bool,
    /// The testbed's instances outlive its driver.
    pub kept: bool,
    pub queues: BTreeSet<String>,
    pub exchanges: BTreeSet<String>,
    /// Migrations in progress, by service.
    pub migrations: BTreeMap<String, InFlight>,
}

/// A migration in progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub migration_id: String,
    pub source: String,
    pub target: String,
    /// The target serves: the migration is finished forward, never rolled back.
    pub committed: bool,
}

/// A testbed's journal file.
pub struct Journal {
    path: PathBuf,
    entry: std::sync::Mutex<Entry>,
}

/// Where this user's journals are: one folder per user, for the user alone.
pub fn folder() -> PathBuf {
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("ms2m-journal-{uid}"))
}

impl Journal {
    /// Starts the journal of a testbed. A journal that cannot be written costs only the
    /// repair of a dead driver's testbed, never the testbed: it is reported and ignored.
    pub fn create(entry: Entry) -> Journal {
        let path = folder().join(format!("{}.json", entry.testbed));
        let j = Journal {
            path,
            entry: std::sync::Mutex::new(entry),
        };
        j.update(|_| {});
        j
    }

    /// Changes the entry and writes it (atomically: a reader never sees half a file).
    pub fn update(&self, change: impl FnOnce(&mut Entry)) {
        let mut entry = self.entry.lock().unwrap();
        change(&mut entry);
        if let Err(e) = write(&self.path, &entry) {
            eprintln!(
                "ms2m: cannot write the testbed's journal {}: {e}",
                self.path.display()
            );
        }
    }

    /// The testbed is gone: nothing to repair.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write(path: &Path, entry: &Entry) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    let dir = path.parent().expect("a journal is in a folder");
    if !dir.is_dir() {
        std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    }
    // SAFETY: getuid(2) cannot fail.
    if std::fs::symlink_metadata(dir)?.uid() != unsafe { libc::getuid() } {
        return Err(std::io::Error::other(format!(
            "{} belongs to another user",
            dir.display()
        )));
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(entry).expect("a journal entry serializes"))?;
    std::fs::rename(&tmp, path)
}

/// Every journal of this user (files of anyone else are never read).
fn entries() -> Vec<(PathBuf, Entry)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(folder()) else {
        return Vec::new();
    };
    // SAFETY: getuid(2) cannot fail.
    let me = unsafe { libc::getuid() };
    dir.flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.is_file() && m.uid() == me))
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let entry = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((p, entry))
        })
        .collect()
}

/// What [`recover`] did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Kept testbeds of dead drivers, left running with one instance per service.
    pub spared: HashSet<String>,
    /// What was repaired or removed, one line each.
    pub done: Vec<String>,
    /// Journals of dead drivers' testbeds that are gone: [`forget`] deletes what they left
    /// on an external broker once their instances are gone too.
    pub gone: Vec<(PathBuf, Entry)>,
}

/// Whether any part of a kept testbed still runs (its containers, or its local directory).
async fn still_there(entry: &Entry) -> bool {
    match entry.runtime {
        Some(RuntimeKind::Docker) => crate::runtime::docker::testbed_has_containers(&entry.testbed)
            .await
            // No daemon answers: nothing can be told, so nothing is forgotten.
            .unwrap_or(true),
        _ => std::env::temp_dir()
            .join(format!("ms2m-{}", entry.testbed))
            .exists(),
    }
}

/// Reads the journals of dead drivers (every one, with `all`): a kept testbed still there is
/// repaired (its migrations finished or rolled back) and spared, unless `all`; the others are
/// returned as gone, for [`forget`].
pub async fn recover(all: bool) -> Recovered {
    let mut out = Recovered::default();
    for (path, mut entry) in entries() {
        if pid_alive(entry.owner) && !all {
            continue;
        }
        if entry.kept && !all && still_there(&entry).await {
            if !repair(&mut entry, &mut out.done).await {
                out.done.push(format!(
                    "testbed {}: kept, but its broker does not answer: left as it is",
                    entry.testbed
                ));
            }
            entry.migrations.clear();
            let _ = write(&path, &entry);
            out.spared.insert(entry.testbed.clone());
            continue;
        }
        out.gone.push((path, entry));
    }
    out
}

/// Deletes what gone testbeds left on an external broker (queues some client still consumes
/// are someone else's: left), then their journals; a journal whose broker does not answer is
/// kept for the next cleanup.
pub async fn forget(gone: Vec<(PathBuf, Entry)>, done: &mut Vec<String>) {
    for (path, entry) in gone {
        if entry.external {
            match delete_resources(&entry).await {
                Ok(n) => done.push(format!(
                    "deleted {n} queue(s) and exchange(s) of testbed {} on its external broker",
                    entry.testbed
                )),
                Err(e) => {
                    done.push(format!(
                        "could not delete testbed {}'s queues on its external broker (kept for \
                         the next cleanup): {e}",
                        entry.testbed
                    ));
                    continue;
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

async fn delete_resources(entry: &Entry) -> crate::error::Result<usize> {
    let link = Link::open(&entry.amqp_url, Duration::from_secs(5)).await?;
    let mut n = 0;
    for q in &entry.queues {
        if link.consumer_count(q).await.unwrap_or(0) == 0 && link.delete_queue(q).await.is_ok() {
            n += 1;
        }
    }
    for x in &entry.exchanges {
        n += usize::from(link.delete_exchange(x).await.is_ok());
    }
    link.close().await;
    Ok(n)
}

/// Leaves one instance serving per service of a kept testbed whose driver died mid-migration.
/// False if its broker does not answer (the testbed is gone).
async fn repair(entry: &mut Entry, done: &mut Vec<String>) -> bool {
    let Ok(link) = Link::open(&entry.amqp_url, Duration::from_secs(3)).await else {
        return false;
    };
    for (service, m) in &entry.migrations {
        let (goes, stays) = match m.committed {
            true => (&m.source, &m.target),
            false => (&m.target, &m.source),
        };
        let _ = link.send(service, goes, Command::Shutdown, &[]).await;
        remove_instance(entry, goes).await;
        // Committed or not, the migration's own queues go (a committed one dies between its
        // commit and their deletion).
        let queues = [
            names::control_queue(service, goes),
            names::replay_queue(service, &m.migration_id),
            names::checkpoint_queue(service, &m.migration_id),
        ];
        for q in &queues {
            let _ = link.delete_queue(q).await;
            entry.queues.remove(q);
        }
        let serving = link
            .command(
                service,
                stays,
                Command::StartLive,
                &[],
                Duration::from_secs(10),
            )
            .await;
        let how = match m.committed {
            true => "finished (the target had taken over)",
            false => "rolled back",
        };
        done.push(match serving {
            Ok(_) => format!(
                "testbed {}: the migration of {service} was {how}: {stays} serves, {goes} removed",
                entry.testbed
            ),
            Err(e) => format!(
                "testbed {}: the migration of {service} was {how}, {goes} removed, but {stays} \
                 did not answer start_live: {e}",
                entry.testbed
            ),
        });
    }
    link.close().await;
    true
}

/// Removes one instance of a kept testbed, as its runtime started it.
async fn remove_instance(entry: &Entry, instance: &str) {
    match entry.runtime {
        Some(RuntimeKind::Docker) => {
            crate::runtime::docker::remove_container_named(&format!(
                "ms2m-{}-{instance}",
                entry.testbed
            ))
            .await
        }
        _ => crate::runtime::local::kill_instance_of(&entry.testbed, instance),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_written_for_its_owner_only_and_removed() {
        let entry = Entry {
            testbed: format!("tbtest{}", std::process::id()),
            owner: std::process::id(),
            amqp_url: "amqp://u:secret@127.0.0.1:5672/%2f".into(),
            ..Entry::default()
        };
        let j = Journal::create(entry.clone());
        j.update(|e| {
            e.queues.insert("s.primary".into());
        });
        let read: Vec<_> = entries()
            .into_iter()
            .filter(|(_, e)| e.testbed == entry.testbed)
            .collect();
        assert_eq!(read.len(), 1);
        assert!(read[0].1.queues.contains("s.primary"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&read[0].0).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        j.remove();
        assert!(!read[0].0.exists());
    }
}
