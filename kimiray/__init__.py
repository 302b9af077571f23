"""kimiray: Kimi-VL served on Ray, with agents for screens, contracts and videos."""

__version__ = "0.1.0"
