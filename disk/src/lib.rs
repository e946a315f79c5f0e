//! Disk formats Cairn reads and edits in place — on a box's disk, on an image file
//! before it is flashed — without root, loop devices or mounts.
//!
//! - [`gpt`]: GUID partition tables: both copies read and checked (signature, header
//!   and entry-array CRC32s, placement), the valid one used when the other is damaged,
//!   and written back backup-first with fresh CRCs so that one copy is valid at every
//!   instant. The agent's GPT boot control, `cairn-hub image` and the image tests use
//!   this one reader.
//! - [`window`]: one partition of a file as a whole device (`Read + Write + Seek`), for
//!   `fatfs` to read and write the FAT on an ESP.
//!
//! Architecture invariant: every byte read from a disk is untrusted; parsing is
//! bounded and total (a malformed table is an error that says what is wrong, never a
//! panic), and nothing here writes outside the table's own sectors or the window.

pub mod gpt;
pub mod window;
