//! Training jobs: each runs on a thread of its own (one at a time), keeps every event it
//! published, and broadcasts new ones to live subscribers (`/ws/train/{id}`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use moera_engine::DeviceKind;
use moera_engine::adapter::LoraSpec;
use moera_engine::dataset::{Dataset, DatasetOptions};
use moera_engine::train::{Trainer, TrainingConfig, TrainingEvent, TrainingStrategy};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::{Registry, lock};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Finished,
    Failed,
}

/// What a job trains, checked.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The model folder or file.
    pub model: PathBuf,
    /// The JSONL examples.
    pub data: PathBuf,
    pub config: TrainingConfig,
    /// Longest example in tokens.
    pub seq_len: usize,
    pub out: PathBuf,
}

struct Progress {
    status: JobStatus,
    events: Vec<TrainingEvent>,
    error: Option<String>,
}

/// One training job.
pub struct Job {
    pub id: String,
    pub out: PathBuf,
    pub model: String,
    progress: Mutex<Progress>,
    live: broadcast::Sender<TrainingEvent>,
}

/// A snapshot of a job for `GET /api/train/{id}`.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    pub id: String,
    pub status: JobStatus,
    pub model: String,
    pub events: usize,
    pub last: Option<TrainingEvent>,
    pub out: PathBuf,
    pub error: Option<String>,
}

/// Whether a job publishes nothing after `event`.
pub fn is_terminal(event: &TrainingEvent) -> bool {
    matches!(
        event,
        TrainingEvent::Finished { .. } | TrainingEvent::Failed { .. }
    )
}

impl Job {
    fn new(id: String, model: String, out: PathBuf) -> Self {
        Self {
            id,
            out,
            model,
            progress: Mutex::new(Progress {
                status: JobStatus::Queued,
                events: Vec::new(),
                error: None,
            }),
            live: broadcast::channel(1024).0,
        }
    }

    /// Records `event` and sends it to the live subscribers.
    pub fn publish(&self, event: TrainingEvent) {
        let mut progress = lock(&self.progress);
        if let TrainingEvent::Failed { error, .. } = &event {
            progress.error = Some(error.clone());
        }
        progress.events.push(event.clone());
        // No subscriber is no error.
        let _ = self.live.send(event);
    }

    fn set_status(&self, status: JobStatus) {
        lock(&self.progress).status = status;
    }

    /// The events so far and a receiver of those to come, with none lost or repeated
    /// between them (both are taken under the lock `publish` holds).
    pub fn subscribe(&self) -> (Vec<TrainingEvent>, broadcast::Receiver<TrainingEvent>) {
        let progress = lock(&self.progress);
        (progress.events.clone(), self.live.subscribe())
    }

    pub fn report(&self) -> JobReport {
        let progress = lock(&self.progress);
        JobReport {
            id: self.id.clone(),
            status: progress.status,
            model: self.model.clone(),
            events: progress.events.len(),
            last: progress.events.last().cloned(),
            out: self.out.clone(),
            error: progress.error.clone(),
        }
    }

    pub fn status(&self) -> JobStatus {
        lock(&self.progress).status
    }

    fn has_failed(&self) -> bool {
        lock(&self.progress)
            .events
            .iter()
            .any(|e| matches!(e, TrainingEvent::Failed { .. }))
    }
}

/// Every job of the server.
#[derive(Default)]
pub struct Jobs {
    jobs: Registry<Arc<Job>>,
    /// Jobs take turns: training uses every core it is given.
    turn: Arc<Mutex<()>>,
    running: Arc<AtomicUsize>,
}

impl Jobs {
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).get(id).cloned()
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Jobs queued or running.
    pub fn pending(&self) -> usize {
        lock(&self.jobs)
            .values()
            .filter(|job| matches!(job.status(), JobStatus::Queued | JobStatus::Running))
            .count()
    }

    /// Queues a job and starts its thread.
    pub fn start(
        &self,
        id: String,
        model_name: String,
        spec: JobSpec,
        device: DeviceKind,
    ) -> std::io::Result<Arc<Job>> {
        let job = Arc::new(Job::new(id.clone(), model_name, spec.out.clone()));
        lock(&self.jobs).insert(id.clone(), Arc::clone(&job));
        let (turn, running) = (Arc::clone(&self.turn), Arc::clone(&self.running));
        let thread_job = Arc::clone(&job);
        let spawned = std::thread::Builder::new()
            .name(format!("moera-{id}"))
            .spawn(move || {
                let job = thread_job;
                let _turn = lock(&turn);
                running.fetch_add(1, Ordering::SeqCst);
                job.set_status(JobStatus::Running);
                tracing::info!(job = %job.id, "training started");
                // A panic in training (a backend failure) ends the job, not the server.
                let trained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    train(&job, &spec, device)
                }))
                .unwrap_or_else(|_| {
                    Err(moera_engine::Error::Generation("training panicked".into()))
                });
                let status = match trained {
                    Ok(()) => {
                        tracing::info!(job = %job.id, out = %spec.out.display(), "training finished");
                        JobStatus::Finished
                    }
                    Err(error) => {
                        tracing::warn!(job = %job.id, %error, "training failed");
                        if !job.has_failed() {
                            job.publish(TrainingEvent::Failed {
                                step: 0,
                                error: error.to_string(),
                            });
                        }
                        JobStatus::Failed
                    }
                };
                job.set_status(status);
                running.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            lock(&self.jobs).remove(&id);
            return Err(e);
        }
        Ok(job)
    }
}

/// Loads, trains and saves (LoRA: the adapter under `out`; full: checkpoints there).
fn train(job: &Arc<Job>, spec: &JobSpec, device: DeviceKind) -> moera_engine::Result<()> {
    let device = device.device()?;
    let lora = matches!(spec.config.strategy, TrainingStrategy::Lora(_));
    let mut trainer = Trainer::new(&spec.model, &device, spec.config.clone())?;
    let options = DatasetOptions {
        max_len: spec.seq_len,
        seed: spec.config.seed,
        ..DatasetOptions::default()
    };
    let data = Dataset::from_jsonl(&spec.data, trainer.model(), &options)?;
    let events = trainer.events().subscribe();
    let forward_job = Arc::clone(job);
    let forward = std::thread::spawn(move || {
        for event in events {
            forward_job.publish(event);
        }
    });
    let summary = trainer.train(&data);
    let model = trainer.into_model();
    // Dropping the trainer closed its bus: the forwarder drains and stops.
    let _ = forward.join();
    summary?;
    if lora {
        model.save_adapter(&spec.out)?;
    }
    Ok(())
}

/// A LoRA spec with PEFT's usual attention targets.
pub fn lora_spec(r: usize, alpha: f64, seed: u64) -> LoraSpec {
    LoraSpec {
        seed,
        ..LoraSpec::new(r, alpha)
    }
}

/// Writes inline examples as JSONL under `dir`.
pub fn write_examples(dir: &Path, examples: &[serde_json::Value]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("data.jsonl");
    let mut text = String::new();
    for example in examples {
        text.push_str(&example.to_string());
        text.push('\n');
    }
    std::fs::write(&path, text)?;
    Ok(path)
}
