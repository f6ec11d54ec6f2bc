"""hubd: an IoT hub for the power data of distributed energy resources."""

__version__ = "0.1.0"
