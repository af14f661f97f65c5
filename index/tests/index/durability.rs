//! Crash safety: a child process makes acknowledged upserts and deletes and is killed with
//! SIGKILL at random moments; after every reopen each acknowledged write is there and no
//! deleted point comes back, and search still finds the points.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use moera_index::{CollectionConfig, DurableCollection, HnswParams, Metric, StoreError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const CHILD_DIR: &str = "MOERA_CRASH_DIR";
const CHILD_BASE: &str = "MOERA_CRASH_BASE";

/// A random vector determined by the id, so both processes know it.
fn vector(id: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(id);
    (0..16).map(|_| rng.random::<f32>() - 0.5).collect()
}

fn config() -> CollectionConfig {
    CollectionConfig {
        hnsw: HnswParams {
            m: 12,
            ef_construction: 100,
            seed: 1,
        },
        ..CollectionConfig::new(16, Metric::Cosine)
    }
}

/// The writer run in the child process; a no-op in a normal test run.
#[test]
fn crash_child() {
    let (Ok(dir), Ok(base)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_BASE)) else {
        return;
    };
    let base: u64 = base.parse().unwrap();
    let collection = match DurableCollection::open(&dir) {
        Ok((c, _)) => c,
        Err(StoreError::NotFound(_)) => DurableCollection::create(&dir, config()).unwrap(),
        Err(e) => panic!("{e}"),
    };
    let mut out = std::io::stdout().lock();
    for step in 0..100_000u64 {
        let id = base + step;
        collection
            .upsert(id, &vector(id), json!({ "id": id }))
            .unwrap();
        writeln!(out, "U {id}").unwrap();
        out.flush().unwrap();
        if step % 7 == 6 {
            // Announce the delete first: if the kill lands before its acknowledgement,
            // the point may or may not be gone, and both are correct.
            writeln!(out, "P {}", id - 3).unwrap();
            out.flush().unwrap();
            collection.delete(id - 3).unwrap();
            writeln!(out, "D {}", id - 3).unwrap();
            out.flush().unwrap();
        }
        if step % 40 == 39 {
            collection.checkpoint().unwrap();
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir: PathBuf = std::env::temp_dir().join(format!("moera-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut rng = StdRng::seed_from_u64(11);
    let mut upserted = BTreeSet::new();
    let mut deleted = BTreeSet::new();
    let mut pending = BTreeSet::new();
    for round in 0..20u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "durability::crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, &dir)
            .env(CHILD_BASE, (round * 1_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            match line.split_once(' ') {
                Some(("U", id)) => {
                    upserted.insert(id.parse::<u64>().unwrap());
                }
                Some(("P", id)) => {
                    pending.insert(id.parse::<u64>().unwrap());
                }
                Some(("D", id)) => {
                    deleted.insert(id.parse::<u64>().unwrap());
                }
                _ => {}
            }
        }

        let (collection, _report) = DurableCollection::open(&dir).expect("reopen after SIGKILL");
        let collection = collection.collection();
        for id in &upserted {
            if deleted.contains(id) {
                assert!(
                    collection.get(*id).is_none(),
                    "round {round}: deleted point {id} came back"
                );
            } else if pending.contains(id) {
                // Killed between the delete and its acknowledgement: either state is right.
                if collection.get(*id).is_none() {
                    deleted.insert(*id);
                }
            } else {
                let point = collection
                    .get(*id)
                    .unwrap_or_else(|| panic!("round {round}: acknowledged {id} lost"));
                assert_eq!(point.payload, json!({ "id": id }));
            }
        }
        // Every live point is found by its own vector.
        let live: Vec<u64> = upserted.difference(&deleted).copied().collect();
        let found = live
            .iter()
            .filter(|&&id| collection.search(&vector(id), 1, 64, None).unwrap()[0].id == id)
            .count();
        assert!(
            found as f64 >= 0.95 * live.len() as f64,
            "round {round}: {found} of {} found",
            live.len()
        );
    }
    assert!(
        upserted.len() > 100,
        "the child made too few writes to test anything"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
