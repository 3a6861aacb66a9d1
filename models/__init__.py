"""fxplan.models"""
