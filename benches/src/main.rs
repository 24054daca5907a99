//! Benchmark runner (see the benchmark issue). Placeholder binary so the
//! workspace builds; the runner is not written yet.
fn main() {
    eprintln!("the benchmark runner is not written yet");
    std::process::exit(2);
}
