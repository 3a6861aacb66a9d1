"""fxplan.passes"""
