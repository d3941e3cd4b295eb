//! Chained CNI plugin and node agent for ambient enrollment.
