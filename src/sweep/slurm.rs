//! The Slurm job-array script of a sweep: task `i` of `n` runs `sweep run CONFIG --shard i/n`
//! (with `--devices visible` when the tasks ask for GPUs, so that they train on the GPUs Slurm
//! grants them).
//!
//! Tasks can die, be preempted or be resubmitted at will: a task skips finished runs, resumes
//! interrupted ones from their checkpoints, and the run locks keep two tasks (or a task and a
//! local worker) off the same run.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};
use crate::sweep::spec::{Plan, SlurmSpec};

/// Everything the script needs besides the sweep's `[slurm]` defaults.
#[derive(Debug, Clone)]
pub struct ScriptOptions {
    /// The `sweep` executable the tasks call (absolute).
    pub binary: String,
    /// The sweep file (absolute).
    pub config: String,
    /// The directory the tasks start in (relative paths of the sweep file resolve there).
    pub workdir: String,
    /// Extra arguments passed to every `sweep run`.
    pub run_args: Vec<String>,
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:%@+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Checks one `#SBATCH` value (no newlines, which would end the directive).
fn directive(field: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.contains(['\n', '\r']) {
        return Err(Error::config(
            field,
            format!("`{value}` must be a non-empty single line"),
        ));
    }
    Ok(())
}

/// The number of array tasks: `slurm.tasks`, else one per run, at most 64.
pub fn task_count(plan: &Plan, slurm: &SlurmSpec) -> usize {
    slurm.tasks.unwrap_or_else(|| plan.runs.len().clamp(1, 64))
}

/// The sbatch script text.
pub fn script(plan: &Plan, slurm: &SlurmSpec, opts: &ScriptOptions) -> Result<String> {
    let tasks = task_count(plan, slurm);
    if tasks == 0 {
        return Err(Error::config("slurm.tasks", "must be >= 1"));
    }
    let mut s = String::from("#!/bin/bash\n");
    let _ = writeln!(s, "#SBATCH --job-name={}", plan.spec.name);
    let array = match slurm.max_parallel {
        Some(0) => return Err(Error::config("slurm.max_parallel", "must be >= 1")),
        Some(m) => format!("0-{}%{m}", tasks - 1),
        None => format!("0-{}", tasks - 1),
    };
    let _ = writeln!(s, "#SBATCH --array={array}");
    let output = match &slurm.output {
        Some(o) => o.clone(),
        None => {
            let logs = Path::new(&opts.workdir)
                .join(&plan.spec.runs_dir)
                .join("slurm");
            format!("{}/%A_%a.out", logs.display())
        }
    };
    directive("slurm.output", &output)?;
    let _ = writeln!(s, "#SBATCH --output={output}");
    let _ = writeln!(s, "#SBATCH --ntasks=1");
    if let Some(c) = slurm.cpus_per_task {
        let _ = writeln!(s, "#SBATCH --cpus-per-task={c}");
    }
    let strings = [
        ("partition", &slurm.partition),
        ("time", &slurm.time),
        ("mem", &slurm.mem),
        ("account", &slurm.account),
    ];
    for (key, value) in strings {
        if let Some(v) = value {
            directive(&format!("slurm.{key}"), v)?;
            let _ = writeln!(s, "#SBATCH --{key}={v}");
        }
    }
    if let Some(g) = slurm.gpus {
        let _ = writeln!(s, "#SBATCH --gres=gpu:{g}");
    }
    for (i, e) in slurm.extra.iter().enumerate() {
        directive(&format!("slurm.extra[{i}]"), e)?;
        let _ = writeln!(s, "#SBATCH {e}");
    }
    let _ = writeln!(
        s,
        "\n# Sweep `{}`: {} runs in {tasks} shards. Each task runs its shard's unfinished runs,\n\
         # resuming interrupted ones; resubmitting this script finishes what is left.\n\
         # Afterwards: {} report {}",
        plan.spec.name,
        plan.runs.len(),
        quote(&opts.binary),
        quote(&opts.config)
    );
    s += "set -euo pipefail\n";
    let _ = writeln!(s, "cd {}", quote(&opts.workdir));
    let logs = Path::new(&output)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if !logs.is_empty() && !logs.contains('%') {
        let _ = writeln!(s, "mkdir -p {}", quote(&logs));
    }
    s += "# One CPU thread per allocated core unless the run config says otherwise.\n";
    s += "export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"\n";
    let mut cmd = format!(
        "exec {} run {} --shard \"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\"",
        quote(&opts.binary),
        quote(&opts.config)
    );
    for a in &opts.run_args {
        cmd.push(' ');
        cmd += &quote(a);
    }
    if slurm.gpus.is_some() {
        // Slurm sets CUDA_VISIBLE_DEVICES to the task's GPUs: one worker trains on each.
        s += "# Each granted GPU (CUDA_VISIBLE_DEVICES) trains one run at a time.\n";
        cmd += " --devices visible";
    }
    let _ = writeln!(s, "{cmd}");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_leaves_plain_words_and_escapes_the_rest() {
        assert_eq!(quote("/a/b-c.toml"), "/a/b-c.toml");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }
}
