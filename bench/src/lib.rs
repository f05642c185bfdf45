//! ringmail's benchmark tools: the `ringmail-load` generator (and its library, used by
//! the tests), plus the criterion suites under `benches/`.

pub mod compare;
pub mod load;
pub mod procstat;
pub mod recovery;
pub mod ring;
pub mod sink;
pub mod wamp;

/// Where a benchmark run's result files go: `OUT/KIND-[LABEL-]<UTC time>` (the caller
/// adds `.json`, `.md`, `.svg`), with `OUT` created first.
pub fn results_base(
    out: &std::path::Path,
    kind: &str,
    label: &str,
) -> Result<std::path::PathBuf, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let dash = if label.is_empty() {
        String::new()
    } else {
        format!("{label}-")
    };
    Ok(out.join(format!("{kind}-{dash}{stamp}")))
}
