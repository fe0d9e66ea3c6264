"""specsurgery: declarative model specs, interaction maps, and provably safe weight surgery."""

__version__ = "0.1.0"
