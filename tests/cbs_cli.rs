//! The `cbs` binary end to end: the JSON summary of the synthetic example, plots, and errors.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/experiments/data/cbs-synthetic.csv"
);

fn cbs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cbs"))
        .args(args)
        .output()
        .expect("run cbs")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "cbs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr_of_failure(out: &Output) -> String {
    assert!(!out.status.success(), "cbs should have failed");
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[test]
fn json_summary_of_the_example() {
    let json: Value = serde_json::from_str(&stdout(&cbs(&["fit", "--csv", EXAMPLE, "--json"])))
        .expect("stdout is JSON");
    let top: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(top, ["groups", "power_laws"]);

    // The example was generated with B* = 93.2·(N/1e6)^0.47 exactly before ±4 % noise on S.
    let groups = json["groups"].as_array().unwrap();
    let names: Vec<&str> = groups
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "chinchilla-85M",
            "chinchilla-151M",
            "chinchilla-302M",
            "chinchilla-604M"
        ]
    );
    for (g, n) in groups.iter().zip([85.0f64, 151.0, 302.0, 604.0]) {
        let mut keys: Vec<&str> = g.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["a", "b", "b_star", "b_star_asymptotic", "group"]);
        let (a, b) = (g["a"].as_f64().unwrap(), g["b"].as_f64().unwrap());
        let b_star = g["b_star"].as_f64().unwrap();
        let asym = g["b_star_asymptotic"].as_f64().unwrap();
        assert!(a > 0.0 && b > 0.0);
        assert!((asym - b / (5.0 * a)).abs() <= 1e-9 * asym);
        assert!((b_star - (1.2 * 256.0 + asym)).abs() <= 1e-9 * b_star);
        let expected = 93.2 * n.powf(0.47);
        assert!(
            (b_star / expected - 1.0).abs() < 0.1,
            "{}: B* = {b_star}, generated with {expected}",
            g["group"]
        );
    }
    let law = &json["power_laws"]["n_params"];
    let mut keys: Vec<&str> = law
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(keys, ["coef", "exponent"]);
    let e = law["exponent"].as_f64().unwrap();
    assert!((e - 0.47).abs() < 0.05, "exponent {e}");
    // N in parameters rather than millions: c = 93.2 / 1e6^0.47 up to the noise.
    let c = law["coef"].as_f64().unwrap() * 1e6f64.powf(e);
    assert!((c / 93.2 - 1.0).abs() < 0.2, "coef in millions {c}");
    // D = 20·N: the same exponent.
    let e_d = json["power_laws"]["tokens"]["exponent"].as_f64().unwrap();
    assert!((e_d - e).abs() < 1e-9);
}

#[test]
fn table_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("out").to_string_lossy().into_owned();
    let text = stdout(&cbs(&[
        "fit", "--csv", EXAMPLE, "--b0", "128", "--plot", &prefix,
    ]));
    assert!(text.contains("B0 = 128"), "{text}");
    assert!(text.contains("chinchilla-604M"), "{text}");
    assert!(text.contains("B* = ") && text.contains("N^"), "{text}");
    for name in [
        "out-steps.png",
        "out-steps.svg",
        "out-steps-overlaid.png",
        "out-steps-overlaid.svg",
        "out-bstar-n_params.png",
        "out-bstar-n_params.svg",
        "out-bstar-tokens.png",
        "out-bstar-tokens.svg",
    ] {
        let path = dir.path().join(name);
        let size = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .len();
        assert!(size > 5_000, "{name}: {size} bytes");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }
    // With --json and --plot, stdout stays pure JSON.
    let sub = dir.path().join("sub/");
    let out = cbs(&[
        "fit",
        "--csv",
        EXAMPLE,
        "--json",
        "--plot",
        &format!("{}/", sub.display()),
    ]);
    let _: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(sub.join("steps.png").exists());
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (
            "missing.csv",
            "group,steps\na,1\n",
            "missing column(s) batch_size",
        ),
        (
            "ragged.csv",
            "group,batch_size,steps\na,64,100\na,128\n",
            "line 3: 2 field(s)",
        ),
        (
            "nan.csv",
            "group,batch_size,steps\na,64,lots\n",
            "line 2: group `a`: `steps` is not a number",
        ),
        (
            "few.csv",
            "group,batch_size,steps\nadamw,64,100\nadamw,128,60\nadamw,64,90\n",
            "group `adamw`: needs at least 3 distinct batch sizes",
        ),
        (
            "negative.csv",
            "group,batch_size,steps\nsoap,64,100\nsoap,128,-60\nsoap,256,40\n",
            "line 3: group `soap`: `steps` must be finite and > 0",
        ),
        (
            "flat.csv",
            "group,batch_size,steps\nflat,64,100\nflat,128,100\nflat,256,100\n",
            "group `flat`: degenerate fit",
        ),
    ];
    for (name, text, expected) in cases {
        let path = write(d, name, text);
        let err = stderr_of_failure(&cbs(&["fit", "--csv", &path, "--json"]));
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
    }
    let err = stderr_of_failure(&cbs(&[
        "fit",
        "--csv",
        &d.join("absent.csv").to_string_lossy(),
    ]));
    assert!(err.contains("absent.csv"), "{err}");
    let err = stderr_of_failure(&cbs(&["fit", "--csv", EXAMPLE, "--b0=-1"]));
    assert!(err.contains("b0"), "{err}");
}
