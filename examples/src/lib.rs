//! Demo support.
