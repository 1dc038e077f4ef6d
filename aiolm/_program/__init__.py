"""The machinery behind :mod:`aiolm.program` (private: import from ``aiolm``)."""
