//! Delta-ADS client (filled in below).
