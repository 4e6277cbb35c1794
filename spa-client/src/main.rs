//! `spa` command-line entry point; everything lives in the library.
fn main() -> std::process::ExitCode {
    spa_client::cli::main()
}
