"""Model factory (timm models and the simple CNN baseline)."""
