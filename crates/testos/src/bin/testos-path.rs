//! Prints the path of the built testos image, for scripts:
//! `qemu-system-x86_64 -kernel "$(cargo run -q -p dvmm-testos --bin testos-path)"`.

fn main() {
    println!("{}", dvmm_testos::TESTOS_ELF);
}
