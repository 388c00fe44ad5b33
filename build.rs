//! Build script for the kernels in `cuda/*.cu` (cuda/README.md).
//!
//! Always: compiles every kernel file with the host C++ compiler against the emulator in
//! `cuda/emu/` into a static library, and writes the table of emulated kernels
//! (`$OUT_DIR/emu_kernels.rs`, included by `src/ops/cuda/emu.rs`). Only g++ (or clang++) is
//! needed for that. The emulator compiles copies of the sources in which every `__shared__`
//! declaration is rewritten into a slot of the block's shared-memory arena (see
//! [`rewrite_shared`]).
//!
//! With `--features cuda`: also compiles every kernel file to PTX for compute_80 with nvcc
//! (found through `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `.cuda-toolchain/` as installed by
//! `tools/install-cuda-toolchain.sh`, then `PATH`) and writes `$OUT_DIR/cuda_ptx.rs`: the PTX
//! text of each module and the module of each kernel.
//!
//! Both tables come from the `CONTRALIGN_KERNEL(name)` lines of the kernel files.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{self, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;

const KERNEL_MACRO: &str = "CONTRALIGN_KERNEL(";
const INSTALL_SCRIPT: &str = "tools/install-cuda-toolchain.sh";
/// The newest PTX ISA that the GPU machines' CUDA 13.0 driver loads.
const MAX_PTX_VERSION: (u32, u32) = (9, 0);

/// One `.cu` file and the kernels it declares with `CONTRALIGN_KERNEL`.
struct Module {
    path: PathBuf,
    name: String,
    kernels: Vec<String>,
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cuda = root.join("cuda");
    let modules = scan_modules(&cuda);

    let emu_sources = out.join("emu_src");
    write_emulator_sources(&cuda, &emu_sources);
    build_emulator(&cuda, &emu_sources, &modules);
    write(&out.join("emu_kernels.rs"), &emu_table(&modules));

    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let nvcc = find_nvcc(&root);
        // A reinstalled or upgraded compiler rebuilds the PTX.
        println!("cargo:rerun-if-changed={}", nvcc.display());
        let ptx_dir = out.join("ptx");
        fs::create_dir_all(&ptx_dir)
            .unwrap_or_else(|e| fail(&format!("{}: {e}", ptx_dir.display())));
        build_ptx(&nvcc, &cuda, &modules, &ptx_dir);
        write(&out.join("cuda_ptx.rs"), &ptx_table(&modules, &ptx_dir));
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    process::exit(1);
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
}

/// Every `cuda/*.cu`, sorted by name, with its kernels.
fn scan_modules(cuda: &Path) -> Vec<Module> {
    let entries = fs::read_dir(cuda).unwrap_or_else(|e| fail(&format!("{}: {e}", cuda.display())));
    let mut paths: Vec<PathBuf> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|e| fail(&format!("{}: {e}", cuda.display())))
                .path()
        })
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    paths.sort();
    let mut seen = std::collections::BTreeMap::new();
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
            let kernels = scan_kernels(&path, &text);
            for kernel in &kernels {
                if let Some(other) = seen.insert(kernel.clone(), name.clone()) {
                    fail(&format!(
                        "kernel `{kernel}` is declared in both {other}.cu and {name}.cu"
                    ));
                }
            }
            Module {
                path,
                name,
                kernels,
            }
        })
        .collect()
}

/// The names in the lines that start with `CONTRALIGN_KERNEL(`.
fn scan_kernels(path: &Path, text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let rest = line.trim_start().strip_prefix(KERNEL_MACRO)?;
            let name = rest.split(')').next().unwrap_or("").trim();
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid || !rest.contains(')') {
                fail(&format!(
                    "{}:{}: expected `CONTRALIGN_KERNEL(name)`",
                    path.display(),
                    i + 1
                ));
            }
            Some(name.to_string())
        })
        .collect()
}

/// Copies every `cuda/*.cu` and `cuda/*.cuh` into `dir` with its `__shared__` declarations
/// rewritten; a `#line` keeps the compiler's messages pointing at the originals.
fn write_emulator_sources(cuda: &Path, dir: &Path) {
    // From scratch: a stale copy of a deleted header would still be found by #include.
    if dir.exists() {
        fs::remove_dir_all(dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    }
    fs::create_dir_all(dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    let entries = fs::read_dir(cuda).unwrap_or_else(|e| fail(&format!("{}: {e}", cuda.display())));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| fail(&format!("{}: {e}", cuda.display())))
            .path();
        if !path
            .extension()
            .is_some_and(|ext| ext == "cu" || ext == "cuh")
        {
            continue;
        }
        let text =
            fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
        let rewritten = rewrite_shared(&text).unwrap_or_else(|(line, message)| {
            fail(&format!("{}:{line}: {message}", path.display()))
        });
        let quoted = path
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        let copy = dir.join(path.file_name().unwrap());
        write(&copy, &format!("#line 1 \"{quoted}\"\n{rewritten}"));
    }
}

/// Rewrites the `__shared__` declarations of a kernel source for the emulator, which gives
/// each block fresh shared memory (cuda/README.md):
///
/// - `__shared__ [__align__(A)] T name[N]...;` becomes
///   `auto& name = ::contralign_emu::shared_variable<T [N]..., (A)>([] {});`
/// - `extern __shared__ [__align__(A)] T name[];` becomes
///   `auto* const name = reinterpret_cast<T*>(::contralign_emu::detail::dynamic_shared);`
///
/// Comments and literals are left alone; line numbers are kept. Errors carry a line number.
fn rewrite_shared(text: &str) -> Result<String, (usize, String)> {
    const KEYWORD: &str = "__shared__";
    let bytes = text.as_bytes();
    let line_of = |pos: usize| text[..pos].matches('\n').count() + 1;
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = String::with_capacity(text.len() + 512);
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                i = text[i..].find('\n').map_or(bytes.len(), |n| i + n);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = text[i + 2..]
                    .find("*/")
                    .map_or(bytes.len(), |n| i + 2 + n + 2);
            }
            quote @ (b'"' | b'\'') => {
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b if ident(b) => {
                let start = i;
                while i < bytes.len() && ident(bytes[i]) {
                    i += 1;
                }
                if &text[start..i] != KEYWORD {
                    continue;
                }
                // The declaration runs from any `extern`/`static` before the keyword to the
                // next semicolon.
                let mut decl_start = start;
                let mut is_extern = false;
                loop {
                    let before = text[..decl_start].trim_end();
                    let word_start = before
                        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .map_or(0, |p| p + 1);
                    match &before[word_start..] {
                        "extern" => is_extern = true,
                        "static" => {}
                        _ => break,
                    }
                    decl_start = word_start;
                }
                let end = text[i..].find(';').map(|n| i + n).ok_or_else(|| {
                    (
                        line_of(start),
                        "`__shared__` declaration without `;`".to_string(),
                    )
                })?;
                let replacement = shared_declaration(&text[i..end], is_extern)
                    .map_err(|message| (line_of(start), message))?;
                out.push_str(&text[copied..decl_start]);
                out.push_str(&replacement);
                // Keep the lines of a declaration that spanned several.
                out.push_str(&"\n".repeat(text[decl_start..end].matches('\n').count()));
                copied = end;
                i = end;
            }
            _ => i += 1,
        }
    }
    out.push_str(&text[copied..]);
    Ok(out)
}

/// The emulator's form of one declaration, from the text between `__shared__` and `;`.
fn shared_declaration(decl: &str, is_extern: bool) -> Result<String, String> {
    if decl.contains("//") || decl.contains("/*") {
        return Err("comments inside a `__shared__` declaration".into());
    }
    // `__align__(A)` may come anywhere before the name.
    let mut rest = decl.to_string();
    let mut align = String::from("0");
    while let Some(at) = rest.find("__align__") {
        let open = rest[at..].find('(').map(|n| at + n);
        let close = open.and_then(|o| rest[o..].find(')').map(|n| o + n));
        let (Some(open), Some(close)) = (open, close) else {
            return Err("malformed `__align__(...)`".into());
        };
        align = format!("({})", rest[open + 1..close].trim());
        rest.replace_range(at..close + 1, " ");
    }
    let (head, dims) = match rest.find('[') {
        Some(bracket) => (rest[..bracket].trim(), rest[bracket..].trim()),
        None => (rest.trim(), ""),
    };
    if head.contains(',') && !head.contains('<') || dims.contains(',') {
        return Err("declare one `__shared__` variable per statement".into());
    }
    let name_start = head
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |p| p + 1);
    let (ty, name) = (head[..name_start].trim(), &head[name_start..]);
    if ty.is_empty() || name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!(
            "cannot read `__shared__{decl}` as `__shared__ TYPE NAME[...]`"
        ));
    }
    if is_extern {
        if dims != "[]" {
            return Err("`extern __shared__` declares an array of unknown size: `NAME[]`".into());
        }
        Ok(format!(
            "auto* const {name} = reinterpret_cast<{ty}*>(::contralign_emu::detail::dynamic_shared)"
        ))
    } else {
        Ok(format!(
            "auto& {name} = ::contralign_emu::shared_variable<{ty} {dims}, {align}>([] {{}})"
        ))
    }
}

/// Two static libraries: the runtime (`emu/runtime.cpp`, `emu/probe.cpp`) as it is, and the
/// kernel files with ThreadSanitizer's instrumentation but not its runtime: the compiler calls
/// `__tsan_read4(address)` and its kind before every load and store, and `emu/probe.cpp`
/// implements those calls (alignment checks always; traffic counting and racecheck in a
/// probed launch).
fn build_emulator(cuda: &Path, emu_sources: &Path, modules: &[Module]) {
    let base = || {
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++17")
            // The rewritten copies first, so that they include each other's rewritten
            // headers; then cuda/ for emu/.
            .include(emu_sources)
            .include(cuda)
            // Kernels run in the emulator for every test; unoptimized they would be ten times
            // slower, whatever the profile.
            .opt_level(2)
            // Rounding as in the PTX, which nvcc compiles with -fmad=false: no contraction of
            // a * b + c into an fma (kernels that want one call fmaf), and the `__d*_rn`
            // intrinsics' uncontracted double arithmetic even with FMA in the target
            // (-march=native in CXXFLAGS).
            .flag_if_supported("-ffp-contract=off");
        build
    };
    let mut runtime = base();
    runtime
        .file(cuda.join("emu/runtime.cpp"))
        .file(cuda.join("emu/probe.cpp"));
    runtime.compile("contralign_emu_runtime");

    let mut kernels = base();
    if !kernels
        .is_flag_supported("-fsanitize=thread")
        .unwrap_or(false)
    {
        fail(
            "the emulator needs a C++ compiler with -fsanitize=thread (g++ or clang++) for its \
             memory probe",
        );
    }
    kernels
        // The kernel files end in .cu, which the compiler would not read as C++ by itself.
        .flag("-x")
        .flag("c++")
        .flag("-fsanitize=thread")
        // GCC: no calls at function entry and exit (probe.cpp has empty ones for clang).
        .flag_if_supported("--param=tsan-instrument-func-entry-exit=0")
        // The probe reports the widths of the kernel's own accesses, not of the host's
        // vector instructions.
        .flag_if_supported("-fno-tree-vectorize")
        .flag_if_supported("-fno-tree-slp-vectorize")
        .flag_if_supported("-fno-vectorize")
        .flag_if_supported("-fno-slp-vectorize");
    for module in modules {
        kernels.file(emu_sources.join(module.path.file_name().unwrap()));
    }
    kernels.compile("contralign_emu");
}

/// `static EMU_KERNELS`, sorted by name, over the entry points that `CONTRALIGN_KERNEL`
/// defines in the emulator build.
fn emu_table(modules: &[Module]) -> String {
    let mut kernels: Vec<&str> = modules
        .iter()
        .flat_map(|m| m.kernels.iter().map(String::as_str))
        .collect();
    kernels.sort_unstable();
    let mut text =
        String::from("// Generated by build.rs from the CONTRALIGN_KERNEL lines of cuda/*.cu.\n\n");
    text.push_str("extern \"C\" {\n");
    for kernel in &kernels {
        writeln!(
            text,
            "    fn contralign_emu_kernel_{kernel}() -> KernelDesc;"
        )
        .unwrap();
    }
    text.push_str("}\n\n/// Every kernel by name, sorted for binary search.\n");
    text.push_str("static EMU_KERNELS: &[(&str, unsafe extern \"C\" fn() -> KernelDesc)] = &[\n");
    for kernel in &kernels {
        writeln!(text, "    ({kernel:?}, contralign_emu_kernel_{kernel}),").unwrap();
    }
    text.push_str("];\n");
    text
}

fn find_nvcc(root: &Path) -> PathBuf {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let nvcc = Path::new(&home).join("bin/nvcc");
            if !nvcc.is_file() {
                fail(&format!(
                    "{var} is set to {}, which has no bin/nvcc",
                    nvcc.display()
                ));
            }
            return nvcc;
        }
    }
    let installed = root.join(".cuda-toolchain/cuda/bin/nvcc");
    if installed.is_file() {
        return installed;
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(nvcc) = env::split_paths(&path)
            .map(|dir| dir.join("nvcc"))
            .find(|p| p.is_file())
        {
            return nvcc;
        }
    }
    fail(&format!(
        "`--features cuda` needs nvcc (CUDA 13.0), and none was found in NVCC, CUDA_HOME, \
         CUDA_PATH, .cuda-toolchain/ or PATH; run {INSTALL_SCRIPT} to install it into \
         .cuda-toolchain/"
    ))
}

/// Compiles every module to `ptx_dir/<module>.ptx`, a few at a time.
fn build_ptx(nvcc: &Path, cuda: &Path, modules: &[Module], ptx_dir: &Path) {
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..jobs.min(modules.len()) {
            scope.spawn(|| {
                while let Some(module) = modules.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = compile_ptx(nvcc, cuda, module, ptx_dir) {
                        errors.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        fail(&errors.join("\n"));
    }
}

fn compile_ptx(nvcc: &Path, cuda: &Path, module: &Module, ptx_dir: &Path) -> Result<(), String> {
    let ptx = ptx_dir.join(format!("{}.ptx", module.name));
    let output = Command::new(nvcc)
        .args([
            "--ptx",
            "-arch=compute_80",
            "-std=c++17",
            "-O3",
            // Rounding that agrees with the emulator's (-ffp-contract=off): no a * b + c
            // contracted into an fma unless the kernel calls fmaf.
            "-fmad=false",
            "-lineinfo",
        ])
        .arg("-I")
        .arg(cuda)
        .arg("-o")
        .arg(&ptx)
        .arg(&module.path)
        .output()
        .map_err(|e| format!("cannot run {}: {e} (see {INSTALL_SCRIPT})", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {}:\n{stderr}",
            module.path.display()
        ));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={}: {line}", module.name);
    }
    let text = fs::read_to_string(&ptx).map_err(|e| format!("{}: {e}", ptx.display()))?;
    check_ptx(module, &text, nvcc)
}

/// The PTX must declare exactly the module's CONTRALIGN_KERNEL kernels (a kernel without the
/// line could not run in the emulator), in a PTX version the GPU machines' driver loads.
fn check_ptx(module: &Module, ptx: &str, nvcc: &Path) -> Result<(), String> {
    let mut entries: Vec<&str> = ptx
        .lines()
        .filter_map(|line| line.split(".entry ").nth(1))
        .map(|rest| rest.split('(').next().unwrap_or("").trim())
        .collect();
    entries.sort_unstable();
    let mut declared: Vec<&str> = module.kernels.iter().map(String::as_str).collect();
    declared.sort_unstable();
    if entries != declared {
        return Err(format!(
            "{}: the PTX defines the kernels {entries:?} but the CONTRALIGN_KERNEL lines name \
             {declared:?}; every `extern \"C\" __global__` kernel needs its line",
            module.path.display()
        ));
    }
    let version = ptx
        .lines()
        .find_map(|line| line.trim().strip_prefix(".version "))
        .and_then(|v| v.trim().split_once('.'))
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)));
    match version {
        Some(v) if v <= MAX_PTX_VERSION => Ok(()),
        Some((major, minor)) => {
            println!(
                "cargo:warning={} emits PTX {major}.{minor}, newer than the {}.{} that a CUDA \
                 13.0 driver (the GPU machines') loads; {INSTALL_SCRIPT} installs nvcc 13.0",
                nvcc.display(),
                MAX_PTX_VERSION.0,
                MAX_PTX_VERSION.1
            );
            Ok(())
        }
        None => Err(format!(
            "{}: no .version line in the PTX",
            module.path.display()
        )),
    }
}

/// `pub const PTX` (module name, PTX text) and `pub const KERNELS` (kernel, module name).
fn ptx_table(modules: &[Module], ptx_dir: &Path) -> String {
    let mut text = String::from("// Generated by build.rs from cuda/*.cu.\n\n");
    text.push_str("/// The PTX of each kernel file (compute_80), by file stem.\n");
    text.push_str("pub const PTX: &[(&str, &str)] = &[\n");
    for module in modules {
        let path = ptx_dir.join(format!("{}.ptx", module.name));
        let path = path
            .to_str()
            .unwrap_or_else(|| fail("OUT_DIR is not UTF-8"));
        writeln!(text, "    ({:?}, include_str!({path:?})),", module.name).unwrap();
    }
    text.push_str("];\n\n/// Every kernel and the PTX module that defines it, sorted by kernel.\n");
    text.push_str("pub const KERNELS: &[(&str, &str)] = &[\n");
    let mut kernels: Vec<(&str, &str)> = modules
        .iter()
        .flat_map(|m| m.kernels.iter().map(|k| (k.as_str(), m.name.as_str())))
        .collect();
    kernels.sort_unstable();
    for (kernel, module) in kernels {
        writeln!(text, "    ({kernel:?}, {module:?}),").unwrap();
    }
    text.push_str("];\n");
    text
}
