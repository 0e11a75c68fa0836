fn main() {
    // Die quietly when stdout is a closed pipe (`provline status | head`), as
    // command-line tools do, instead of panicking on the write.
    // SAFETY: called first, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(provline::cli::main());
}
