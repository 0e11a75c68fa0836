fn main() {
    std::process::exit(provline::cli::main());
}
